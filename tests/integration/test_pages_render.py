"""The run report and the explanation gallery as a person sees them: opened in headless
Chromium at two window widths, every picture must load, no text may run over a picture or
other text, and a value the files hold must not read "n/a".

Fast: the report comes from a synthetic history written through RunHistory (no
simulation); the gallery from a one-epoch model on a tiny features-only site. The gallery
with real images is checked in test_image_path.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from micromil_core.cli import main
from micromil_core.federated.history import RoundRecord, RunHistory, RunInfo
from micromil_core.report import write_report
from tests.browser import probe
from tests.conftest import write_site

WIDTHS = (1280, 800)
STARTED = "2026-12-06T20:00:00+00:00"
TRAIN, HOLDOUT = ["site-0", "site-1"], "site-3"


def _round(r: int) -> RoundRecord:
    """One fully reported round: every value the report shows is present."""
    train = {s: {"num-examples": 20 + i, "train_loss": 0.7 - 0.1 * r - 0.01 * i, "epsilon": 0.45 * r}
             for i, s in enumerate(TRAIN)}
    evaluate = {s: {"num-examples": 8 + i, "loss": 0.61 + 0.01 * i, "auc": 0.7 + 0.05 * r}
                for i, s in enumerate(TRAIN)}
    held = {"auc": 0.8, "accuracy": 0.7, "balanced_accuracy": 0.72, "f1": 0.69,
            "sensitivity": 0.75, "specificity": 0.65, "auc_ci_low": 0.61, "auc_ci_high": 0.93}
    return RoundRecord(
        round=r, wall_seconds=3.0 + r, bytes_sent=2_000_000, bytes_received=1_900_000,
        train=train, train_aggregated={"train_loss": 0.65 - 0.1 * r, "val_auc": 0.7},
        evaluate=evaluate, evaluate_aggregated={"loss": 0.615, "auc": 0.7 + 0.05 * r},
        holdout={HOLDOUT: {**held, "num-examples": 17, "roc_fpr": [0.0, 0.3, 1.0],
                           "roc_tpr": [0.0, 0.8, 1.0]}},
        holdout_aggregated=held,
    )


def _check(facts: dict, page: Path, width: int, fits: bool = True) -> None:
    """Every picture loaded, nothing overlaps and (``fits``) no sideways scrolling."""
    where = f"{page.name} at {width} px"
    assert not facts["broken"], f"{where}: pictures that did not load: {facts['broken']}"
    assert not facts["overlaps"], f"{where}: text over a picture or text: {facts['overlaps'][:5]}"
    if fits:
        assert not facts["overflow"], f"{where}: wider than {facts['width']}: {facts['wide']}"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    info = RunInfo("micromil", "fedavg", 2, 1, 0, TRAIN, [HOLDOUT], STARTED)
    RunHistory(info, [_round(1), _round(2)]).write(run)
    return write_report(run)


@pytest.mark.parametrize("width", WIDTHS)
def test_report_loads_every_figure_and_shows_the_values(report, width):
    facts = probe(report, width)
    _check(facts, report, width, fits=False)  # see test_report_fits_800_px
    assert len(facts["images"]) >= 5 and all(w > 100 and h > 100 for w, h in facts["images"])
    text = facts["text"]
    assert STARTED in text  # started (UTC)
    rows = {line.split("\t")[0]: line.split("\t") for line in text.splitlines() if "\t" in line}
    # Per-site validation loss (from the evaluation reply), DP epsilon, the held-out site's n.
    assert rows["site-0"][4:6] == ["0.610", "0.800"] and rows["site-1"][4] == "0.620", rows
    assert "n/a" not in rows["site-0"] + rows["site-1"], rows
    assert rows[HOLDOUT][-1] == "17", rows[HOLDOUT]


def test_report_has_no_na_where_the_history_has_the_value(report):
    text = probe(report)["text"]
    assert "n/a" not in text, [line for line in text.splitlines() if "n/a" in line]


def test_report_fits_800_px(report):
    facts = probe(report, 800)
    assert not facts["overflow"], facts["wide"]


@pytest.mark.parametrize("model", ["micromil", "abmil"])
def test_features_only_gallery_says_so_and_lists_scores(tmp_path, model, capsys):
    site = write_site(tmp_path / "site-a", n_patients=8)
    run, out = tmp_path / "run", tmp_path / "eval"
    assert main(["train", "--data", str(site), "--model", model, "--epochs", "1",
                 "--set", "train.num_threads=1", "--out", str(run)]) == 0
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(site),
                 "--explain", "--out", str(out)]) == 0
    capsys.readouterr()
    index = out / "explain" / "site-a" / "index.html"
    assert len(list(index.parent.glob("*.png"))) == 8  # one picture per patient, as before
    for width in WIDTHS:
        facts = probe(index, width)
        _check(facts, index, width)
        assert len(facts["images"]) == 8 and min(h for _, h in facts["images"]) >= 256
        text = facts["text"]
        assert "this site has features only: no images to show; instance scores are listed" \
            in text.lower()
        assert "How to read the pictures" in text and "Colours" in text
        assert ("Graph" in text) == (model == "micromil")
        # Every patient's scores are written out: "#<instance>: <score>".
        assert len(re.findall(r"#\d+: \d\.\d{4}", text)) >= 8
