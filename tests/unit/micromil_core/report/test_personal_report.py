"""The report's "Personal models" section and the CLI's own-patient table (issue 24).

The data follow a real `micromil compare --personalise finetune` run on the tiny synthetic
sites: two training sites whose test patients are one class (AUC null), one with six test
patients, and every validation AUC withheld by the small-count guard.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from pathlib import Path

import pytest

from micromil_core.report import (
    comparison_rows,
    format_own_patients,
    personalisation_section,
    render_report,
    write_report,
)
from micromil_core.report.personal import format_interval, own_patients_figure

PNG = "data:image/png;base64,"
NBSP = "\u00a0"


def _diff(d: float, low: float, high: float) -> dict[str, float]:
    return {"difference": d, "low": low, "high": high}


def _model(auc: float | None, accuracy: float, n: int) -> dict:
    return {"auc": auc, "accuracy": accuracy, "balanced_accuracy": accuracy, "n": n}


def _one_class(n: int = 1) -> dict:
    """A site whose test patients are all one class: no AUC, no paired AUC difference."""
    return {"local": _model(None, 1.0, n), "global": _model(None, 0.0, n),
            "personalised": _model(None, 0.0, n),
            "personalised_minus_global": None, "personalised_minus_local": None}


def _own_patients() -> dict:
    site_2 = {
        "local": _model(0.0, 0.833, 6), "global": _model(0.4, 0.833, 6),
        "personalised": _model(0.4, 0.667, 6),
        "personalised_minus_global": {"auc": _diff(0.0, 0.0, 0.0),
                                      "accuracy": _diff(-0.167, -0.5, 0.0)},
        "personalised_minus_local": {"auc": _diff(0.4, 0.0, 0.8),
                                     "accuracy": _diff(-0.167, -0.5, 0.0)},
    }
    return {
        "per_site": {"site-0": _one_class(), "site-1": _one_class(), "site-2": site_2},
        "mean_personalised_minus_global": {"auc": {**_diff(0.0, 0.0, 0.0), "sites": 1}},
        "mean_personalised_minus_local": {"auc": {**_diff(0.4, 0.0, 0.8), "sites": 1}},
    }


def _comparison() -> dict:
    federated = {"auc": 0.667, "accuracy": 0.294, "n": 17}
    return {"federated": federated, "pooled": {**federated, "auc": 0.717},
            "local": {"site-0": {**federated, "auc": 0.617}},
            "federated_minus_pooled": {"auc": _diff(-0.05, -0.25, 0.183)},
            "own_patients": _own_patients()}


def _personalised() -> dict:
    withheld = ["val_auc_global", "val_auc_personal", "personal_epoch"]
    return {
        "method": "finetune",
        "per_site": {
            "site-0": {"num-examples": 3, "num_val": 2, "seconds": 0.24, "min_patients": 5,
                       "suppressed": withheld},
            "site-2": {"num-examples": 18, "num_val": 27, "seconds": 0.82, "min_patients": 5, "personal_folds": 5,
                       "personal_epoch": 0, "val_auc_global": 0.71, "val_auc_personal": 0.69,
                       "suppressed": []},
            "<site&3>": {"num-examples": 30, "num_val": 10, "seconds": 1.5, "min_patients": 5,
                         "personal_epoch": 2, "val_auc_global": 0.6, "val_auc_personal": 0.75},
        },
        "failures": ["site-1: <no reply> within 600 s"],
        "chosen_by": "class-weighted loss", "rule": "one-se",
    }


def _metrics() -> dict:
    return {"auc": 0.667, "n": 17, "per_site": {"site-3": {"auc": 0.667, "n": 17}},
            "personalised": _personalised()}


def _history() -> dict:
    train = {s: {"num-examples": 10, "train_loss": 0.6} for s in ("site-0", "site-1", "site-2")}
    return {"run": {"model": "micromil", "strategy": "fedavg", "rounds": 1,
                    "train_sites": list(train), "holdout_sites": ["site-3"]},
            "rounds": [{"round": 1, "train": train, "evaluate": {}, "holdout": {},
                        "failures": []}]}


def _rows(section: str) -> dict[str, list[str]]:
    """Table rows by their first cell, each as its cells' text (several tables may share a
    site name, so a row's key is "<first cell>#<k>" for its k-th occurrence)."""
    rows: dict[str, list[str]] = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", section):
        cells = [c.replace(NBSP, " ") for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr)]
        k = sum(key.split("#")[0] == cells[0] for key in rows)
        rows[f"{cells[0]}#{k}"] = cells
    return rows


@pytest.fixture(scope="module")
def section() -> str:
    return personalisation_section(_metrics(), _comparison())


def test_section_has_the_bars_figure_and_a_row_per_site(section):
    assert section.startswith('<section id="personal">\n<h2>Personal models</h2>')
    assert section.count(PNG) == 1  # the own-patient bars
    assert "<b>finetune</b>" in section
    rows = _rows(section)
    assert rows["site-2#0"] == ["site-2", "6", "0.000", "0.400", "0.400",
                                "+0.000 (95% CI +0.000 to +0.000)",
                                "+0.400 (95% CI +0.000 to +0.800)"]
    # A one-class site: its AUCs and AUC differences read n/a, its patient count is known.
    assert rows["site-0#0"] == ["site-0", "1", *["n/a"] * 5]
    assert "site-1#0" in rows
    assert "mean personalised − global AUC over 1 site: +0.000 (95% CI +0.000 to +0.000)" in section
    assert "mean personalised − local AUC over 1 site: +0.400 (95% CI +0.000 to +0.800)" in section
    assert "validation patients" in section and "test patients" in section


def test_validation_choice_shows_withheld_values_as_suppressed(section):
    rows = _rows(section)
    assert rows["site-0#1"][1:] == ["3", "validation split", "2", *["suppressed (n &lt; 5)"] * 3, "0.2 s"]
    assert rows["site-2#1"][2:7] == ["5-fold CV (train + val)", "27", "0.710", "0.690", "0 (global kept)"]
    assert rows["&lt;site&amp;3&gt;#0"][4:7] == ["0.600", "0.750", "2"]
    assert '<li class="fail">site-1: &lt;no reply&gt; within 600 s</li>' in section
    assert "<site&3>" not in section and "<no reply>" not in section


def test_the_choice_paragraph_names_what_the_run_recorded(section):
    assert ("The choice maximises the class-weighted loss (<code>train.select_on</code>); with CV it "
            "takes the fewest epochs (the global model first) whose mean over the CV folds is within "
            "one standard error of the best mean") in section
    assert "<code>federation.personal_rule: one-se</code>" in section
    assert "may therefore be kept with a lower AUC" in section
    by_auc = personalisation_section({"personalised": {**_personalised(), "chosen_by": "AUC", "rule": "best"}}, None)
    assert "maximises the AUC" in by_auc and "the epoch count with the best mean" in by_auc
    assert "lower AUC" not in by_auc
    # A run from before the rule was recorded gets the default's general words.
    old = {k: v for k, v in _personalised().items() if k not in ("chosen_by", "rule")}
    older = personalisation_section({"personalised": old}, None)
    assert "maximises <code>train.select_on</code> (by default the class-weighted loss)" in older
    assert "personal_rule" not in older


def test_section_is_empty_without_personal_models():
    assert personalisation_section(None, None) == ""
    assert personalisation_section({"auc": 0.7}, {"federated": {"auc": 0.7}}) == ""
    assert personalisation_section({}, {"own_patients": {"per_site": {}}}) == ""
    page = render_report(_history(), metrics={"auc": 0.7}, comparison={"federated": {"auc": 0.7}})
    assert 'id="personal"' not in page and "Personal models" not in page


def test_either_source_alone_gives_its_part():
    only_choice = personalisation_section(_metrics(), None)
    assert PNG not in only_choice and "own test patients" not in only_choice
    assert "0 (global kept)" in only_choice
    only_own = personalisation_section(None, _comparison())
    assert only_own.count(PNG) == 1 and "Method:" not in only_own
    assert "validation patients)</h3>" not in only_own


def test_report_places_the_section_after_the_comparison():
    page = render_report(_history(), metrics=_metrics(), comparison=_comparison())
    ids = re.findall(r'<section id="([a-z]+)">', page)
    assert ids[-2:] == ["comparison", "personal"]
    assert '<a href="#personal">Personal models</a>' in page


def test_figure_marks_sites_without_an_auc():
    per_site = _own_patients()["per_site"]
    assert own_patients_figure(per_site).startswith(PNG)
    # Every site one class: nothing to draw, and the section says so instead of a blank chart.
    one_class = {"site-0": _one_class(), "site-1": _one_class()}
    assert own_patients_figure(one_class) is None
    section = personalisation_section(None, {"own_patients": {"per_site": one_class}})
    assert PNG not in section and "n/a (no finite values)" in section
    assert "mean personalised − global AUC over sites: n/a" in section


def test_format_interval():
    assert format_interval(_diff(0.012, -0.03, 0.05)) == "+0.012 (95% CI -0.030 to +0.050)"
    assert format_interval(None) == "n/a"
    assert format_interval({"difference": float("nan"), "low": 0, "high": 1}) == "n/a"


def test_comparison_rows_leave_out_own_patients():
    rows = comparison_rows(_comparison())
    assert list(rows) == ["federated", "pooled", "local/site-0"]
    page = render_report(_history(), comparison=_comparison())
    comparison = page[page.index('<section id="comparison">'):page.index('<section id="personal">')]
    assert "own_patients" not in comparison


def test_cli_own_patients_table():
    lines = format_own_patients(_comparison()).splitlines()
    assert lines[1] == ("| site | n | local AUC | global AUC | personalised AUC "
                        "| personalised - global |")
    assert lines[3] == "| site-0 | 1 | n/a | n/a | n/a | n/a |"
    assert lines[5] == "| site-2 | 6 | 0.000 | 0.400 | 0.400 | +0.000 (95% CI +0.000 to +0.000) |"
    assert lines[-2:] == [
        "mean personalised - global AUC over 1 site: +0.000 (95% CI +0.000 to +0.000)",
        "mean personalised - local AUC over 1 site: +0.400 (95% CI +0.000 to +0.800)",
    ]
    assert format_own_patients({"federated": {"auc": 0.7}}) == ""
    assert format_own_patients(None) == ""


def test_compare_command_prints_the_own_patient_table(tmp_path, monkeypatch, capsys):
    from server import simulation_cli

    # Stand-ins for the configuration and the simulation: only the printing is under test.
    fake = types.ModuleType("server.simulation")
    fake.compare = lambda cfg, out, overwrite=False: _comparison()
    monkeypatch.setitem(sys.modules, "server.simulation", fake)
    monkeypatch.setattr(simulation_cli, "experiment_config", lambda args: None)
    monkeypatch.setattr(simulation_cli, "claim_out", lambda args, *names: None)
    args = argparse.Namespace(out=str(tmp_path), overwrite=False)
    assert simulation_cli.cmd_compare(args) == 0
    out = capsys.readouterr().out
    assert "| own_patients " not in out
    assert "| site-2 | 6 | 0.000 | 0.400 | 0.400 | +0.000 (95% CI +0.000 to +0.000) |" in out
    assert "mean personalised - local AUC over 1 site: +0.400" in out
    assert out.index("federated minus pooled") < out.index("own test patients")


@pytest.mark.parametrize("width", [1280, 800])
def test_section_renders_in_a_browser(tmp_path, width):
    """Opened in headless Chromium: the figure loads, no text runs over a picture or other
    text, the page never scrolls sideways, and the values read as in the files."""
    from tests.browser import probe

    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text(json.dumps(_history()))
    (run / "metrics.json").write_text(json.dumps(_metrics()))
    (run / "compare.json").write_text(json.dumps(_comparison()))
    facts = probe(write_report(run), width)
    assert not facts["broken"], facts["broken"]
    assert not facts["overlaps"], facts["overlaps"][:5]
    assert not facts["overflow"], facts["wide"]
    text = facts["text"].replace(NBSP, " ")
    personal = text[text.rindex("Personal models\n"):]  # the heading, not the nav link
    assert "site-2\t6\t0.000\t0.400\t0.400" in personal
    assert "suppressed (n < 5)" in personal and "0 (global kept)" in personal
    assert "over 1 site: +0.400 (95% CI +0.000 to +0.800)" in personal
    assert "federation.personal_rule: one-se" in personal
    assert Path(run / "report.html").read_text().count(PNG) >= 2
