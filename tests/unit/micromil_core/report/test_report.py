"""The run report: one offline HTML file from history.json (+ metrics.json, compare.json)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from micromil_core.report import (
    CORE_KEYS,
    ReportError,
    comparison_rows,
    format_table,
    render_report,
    table_keys,
    write_report,
)

PNG = "data:image/png;base64,"
TRAIN_SITES = ["site-0", "site-1", "<site&1>"]
HOLDOUT = "site-3"


def _metrics(auc: float, n: int = 15) -> dict[str, float]:
    return {
        "auc": auc,
        "accuracy": auc - 0.1,
        "balanced_accuracy": auc - 0.12,
        "f1": auc - 0.15,
        "sensitivity": auc - 0.05,
        "specificity": auc - 0.2,
        "n": n,
    }


def _history(n_rounds: int = 3) -> dict:
    rounds = []
    for r in range(1, n_rounds + 1):
        train = {
            s: {
                "train_loss": 0.7 - 0.05 * r - 0.01 * i,
                "num-examples": 14,
                "val_auc": 0.6 + 0.05 * r,
                "val_loss": 0.65 - 0.03 * r,
                "epsilon": 0.5 * r,
            }
            for i, s in enumerate(TRAIN_SITES)
        }
        holdout_metrics = {k: v for k, v in _metrics(0.6 + 0.08 * r).items() if k != "n"}
        rounds.append(
            {
                "round": r,
                "wall_seconds": 10.0 + r,
                "bytes_sent": 3_000_000 + r,
                "bytes_received": 2_900_000,
                "train": train,
                "train_aggregated": {"train_loss": 0.7 - 0.05 * r, "val_auc": 0.6 + 0.05 * r},
                "evaluate": {s: {"auc": 0.6 + 0.06 * r, "num-examples": 5} for s in TRAIN_SITES},
                "evaluate_aggregated": {"auc": 0.6 + 0.06 * r},
                "holdout": {
                    HOLDOUT: {
                        **holdout_metrics,
                        "num-examples": 15,
                        "roc_fpr": [0.0, 0.0, 0.2, 0.5, 1.0],
                        "roc_tpr": [0.0, 0.4, 0.7, 0.9, 1.0],
                    }
                },
                "holdout_aggregated": holdout_metrics,
                "failures": ["<site&1>: no reply within 600 s"] if r == 2 else [],
            }
        )
    return {
        "run": {
            "model": "micromil",
            "strategy": "fedavg",
            "rounds": n_rounds,
            "local_epochs": 1,
            "seed": 0,
            "train_sites": TRAIN_SITES,
            "holdout_sites": [HOLDOUT],
            "started": "2024-05-01T10:00:00",
        },
        "rounds": rounds,
    }


def _comparison() -> dict:
    return {
        "federated": _metrics(0.84, 40),
        "pooled": _metrics(0.86, 40),
        "local_mean": _metrics(0.72, 40),
        "local": {s: _metrics(0.7 + 0.01 * i, 40) for i, s in enumerate(TRAIN_SITES)},
    }


def _write(run: Path, name: str, obj: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(json.dumps(obj))


def _section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)">', page)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("run")
    _write(run, "history.json", _history())
    _write(run, "metrics.json", {**_metrics(0.83), "per_site": {HOLDOUT: _metrics(0.83)}})
    _write(run, "compare.json", _comparison())
    path = write_report(run, title="Pilot <run>")
    return run, path.read_text()


def test_full_report_is_one_self_contained_file(full_report):
    run, page = full_report
    assert sorted(p.name for p in run.iterdir() if not p.name.endswith(".json")) == ["report.html"]
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Offline: nothing fetched, nothing executed.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)


def test_full_report_sections_and_images(full_report):
    _, page = full_report
    assert _section_ids(page) == [
        "summary",
        "holdout",
        "curves",
        "roc",
        "sites",
        "communication",
        "failures",
        "comparison",
    ]
    # loss, validation AUC, held-out curves, ROC, held-out bars, training-site bars,
    # communication, comparison AUC.
    assert page.count(PNG) == 8
    assert "micromil" in page and "fedavg" in page
    assert "8.6 MiB" in page  # bytes sent, three rounds of ~2.9 MiB
    assert "0.830" in page  # held-out AUC from metrics.json
    for row in ("federated", "pooled", "local_mean", "local/site-0"):
        assert f"<td>{row}</td>" in page
    assert "no reply within 600 s" in page and "round 2" in page


def test_strings_are_escaped(full_report):
    _, page = full_report
    assert "<site&1>" not in page
    assert "&lt;site&amp;1&gt;" in page
    assert "<title>Pilot &lt;run&gt;</title>" in page


def test_minimal_history_does_not_crash(tmp_path):
    history = {
        "run": {"model": "micromil", "train_sites": ["a_site"], "holdout_sites": []},
        "rounds": [
            {
                "round": 1,
                "train": {"a_site": {"train_loss": 0.69, "val_auc": float("nan")}},
                "train_aggregated": {"train_loss": 0.69, "val_auc": float("nan")},
                "evaluate": {},
                "holdout": {},
                "failures": [],
            }
        ],
    }
    _write(tmp_path, "history.json", history)  # json.dumps writes NaN as a bare token
    page = write_report(tmp_path).read_text()
    assert "comparison" not in _section_ids(page)
    assert "No failures recorded." in page
    assert "n/a" in page
    # Train loss curve and training-site bars only: no finite validation AUC, no held-out
    # site (curves, ROC, bars) and no bytes or wall time to chart.
    assert page.count(PNG) == 2
    assert "<title>micromil-fl run: " in page


def test_holdout_without_roc_and_fallback_to_history(tmp_path):
    history = _history(n_rounds=1)
    for key in ("roc_fpr", "roc_tpr"):
        del history["rounds"][0]["holdout"][HOLDOUT][key]
    page = render_report(history, comparison=None)
    assert "no ROC points" in page
    assert "round 1 (metrics.json not found)" in page
    assert "comparison" not in _section_ids(page)


def test_comparison_argument_overrides_file(tmp_path):
    _write(tmp_path, "history.json", _history(n_rounds=1))
    _write(tmp_path, "compare.json", {"federated": _metrics(0.1)})
    page = write_report(tmp_path, comparison={"pooled": _metrics(0.9)}).read_text()
    assert "<td>pooled</td>" in page and "<td>federated</td>" not in page


def test_empty_rounds_and_bad_inputs(tmp_path):
    page = render_report({"run": {}, "rounds": []})
    assert "summary" in _section_ids(page) and PNG not in page
    with pytest.raises(ReportError, match="history.json: not found"):
        write_report(tmp_path)
    (tmp_path / "history.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_report(tmp_path)
    _write(tmp_path, "history.json", {"run": {}})
    with pytest.raises(ReportError, match="'rounds' list"):
        write_report(tmp_path)


def test_comparison_rows_flattens_local_sites():
    rows = comparison_rows(_comparison())
    assert list(rows)[:4] == ["federated", "pooled", "local_mean", "local/site-0"]
    assert "local" not in rows


def test_format_table_markdown():
    rows = {
        "federated": {"auc": 0.8123, "accuracy": 0.75, "n": 40},
        "local/a|b": {"auc": math.nan},
    }
    table = format_table(rows, ["auc", "accuracy", "n"], row_header="setup")
    assert table.splitlines() == [
        "| setup | auc | accuracy | n |",
        "|---|---:|---:|---:|",
        "| federated | 0.812 | 0.750 | 40 |",
        r"| local/a\|b | n/a | n/a | n/a |",
    ]
    assert format_table({}, CORE_KEYS).count("\n") == 1


def test_comparison_table_shows_the_auc_interval_when_known():
    table = _comparison()
    assert table_keys(comparison_rows(table)) == CORE_KEYS  # no intervals: no column
    table["federated"]["ci95"] = {"auc": [0.61, 0.93], "accuracy": [0.5, 0.8]}
    rows = comparison_rows(table)
    keys = table_keys(rows)
    assert keys[:2] == ("auc", "auc_ci95")
    lines = format_table(rows, keys).splitlines()
    federated = next(line for line in lines if line.startswith("| federated "))
    assert "| 0.610–0.930 |" in federated
    pooled = next(line for line in lines if line.startswith("| pooled "))
    assert pooled.split("|")[3].strip() == "n/a"


def test_withheld_metrics_read_as_suppressed_not_missing():
    """Small-count guard: a metric a site withheld shows why, in the report and the CLI table."""
    small = {"num-examples": 2, "min_patients": 5, "suppressed": ["auc", "loss"]}
    history = {"run": {}, "rounds": [{
        "round": 1,
        "train": {"h1": {"num-examples": 12, "train_loss": 0.4, "min_patients": 5}},
        "evaluate": {"h1": small},
        "evaluate_aggregated": {"min_patients": 5, "suppressed": ["auc", "loss"]},
        "holdout": {}, "holdout_aggregated": {},
    }]}
    page = render_report(history, comparison=None)
    assert page.count("suppressed (n &lt; 5)") >= 3  # val loss and val AUC cells, the AUC-curve note
    assert format_table({"h1": {**small, "accuracy": 0.5}}, ["auc", "accuracy"]).splitlines()[-1] == (
        "| h1 | suppressed (n < 5) | 0.500 |"
    )
