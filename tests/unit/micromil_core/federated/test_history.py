"""history.json is written and read through one typed module (federated/history.py)."""

import json
from datetime import datetime

import pytest

from micromil_core.federated.history import (
    HistoryError,
    RoundRecord,
    RunHistory,
    RunInfo,
    read_history,
)
from micromil_core.report import render_report


def _history() -> RunHistory:
    record = RoundRecord(
        round=1, wall_seconds=2.5, bytes_sent=1000, bytes_received=900,
        train={"a": {"num-examples": 12, "train_loss": 0.5}},
        evaluate={"a": {"num-examples": 6, "loss": 0.61, "auc": 0.7}},
        evaluate_aggregated={"loss": 0.61, "auc": 0.7},
        failures=["b: not connected"], rejected={"train": {"b": "late"}, "evaluate": {}},
    )
    info = RunInfo("micromil", "fedavg", 3, 1, 0, ["a", "b"], ["h"], "2026-12-06T20:00:00+00:00")
    return RunHistory(info, [record])


def test_round_trip_through_the_file(tmp_path):
    h = _history()
    h.write(tmp_path)
    back = read_history(tmp_path)
    assert back == h
    assert back.rounds[0].validation_loss == pytest.approx(0.61)
    # The file keeps the keys that scripts and earlier tools read.
    raw = json.loads((tmp_path / "history.json").read_text())
    assert set(raw) == {"run", "rounds"} and raw["rounds"][0]["train"]["a"]["train_loss"] == 0.5
    assert "central_dp" not in raw["rounds"][0]  # only in runs with central DP


def test_older_and_odd_files_read_with_defaults():
    h = RunHistory.from_dict({"run": {"model": "abmil"}, "rounds": [
        {"train": {"a": {"train_loss": 1.0}, "bad": 3}, "failures": "one failure"},
        "not a round",
        {"round": 7.0, "bytes_sent": 10.0, "wall_seconds": float("nan")},
    ]})
    first, second = h.rounds
    assert (first.round, second.round) == (1, 7)  # a round without a number is numbered by position
    assert first.train == {"a": {"train_loss": 1.0}} and first.failures == ["one failure"]
    assert second.bytes_sent == 10 and isinstance(second.bytes_sent, int)
    assert second.wall_seconds is None  # NaN is "not known", as strict JSON writes it
    assert h.run.model == "abmil" and h.run.started is None and h.run.train_sites == []


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"run": {}}', "'rounds' list"),
    ("[1, 2]", "'rounds' list"),
])
def test_unreadable_history_is_one_clear_error(tmp_path, content, match):
    if content is not None:
        (tmp_path / "history.json").write_text(content)
    with pytest.raises(HistoryError, match=match) as err:
        read_history(tmp_path)
    assert str(tmp_path / "history.json") in str(err.value)


def test_report_reads_the_typed_fields():
    h = _history()
    page = render_report(h)
    assert "2026-12-06T20:00:00+00:00" in page  # started
    assert "1 completed of 3 planned" in page
    # The training site's validation loss comes from its evaluation reply.
    assert '<td class="num">0.610</td>' in page
    assert "b: not connected" in page


def test_validation_loss_reported_beside_training_shows_when_no_evaluation_ran():
    h = RunHistory(RunInfo(), [RoundRecord(1, train={"a": {
        "num-examples": 20, "train_loss": 0.4, "val_loss": 0.55, "num_val": 8}})])
    page = render_report(h)
    assert '<td class="num">0.550</td>' in page and '<td class="num">8</td>' in page


def test_started_is_utc_iso_and_survives_a_resume(tmp_path):
    import torch

    from micromil_core.config import ExperimentConfig
    from micromil_core.federated.run_state import RunState, load_run_state
    from micromil_core.federated.setup import experiment_spec

    cfg = ExperimentConfig()
    spec = experiment_spec(cfg, 4, ["negative", "positive"])
    w = {"x": torch.zeros(1)}
    state = RunState(1, w, _history().rounds, 1, w, 0.6)
    assert datetime.fromisoformat(state.started).utcoffset().total_seconds() == 0
    state.save(tmp_path / "s.pt", {"experiment": cfg.to_dict(), "spec": [spec.name, spec.in_dim, spec.n_classes]})
    back = load_run_state(tmp_path / "s.pt", cfg, spec)
    assert back.started == state.started and back.history == state.history
