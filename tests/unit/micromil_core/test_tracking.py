"""Experiment tracking (micromil_core.tracking): what a run logs is read back through
MLflow's and TensorBoard's own readers, and tracking off leaves no trace."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from micromil_core.cli import main
from micromil_core.config import build_config, load_config
from micromil_core.errors import ConfigError
from micromil_core.federated.history import RoundRecord
from micromil_core.tracking import (
    default_mlflow_uri,
    flatten_config,
    log_outputs,
    open_tracker,
    round_metrics,
)
from tests.conftest import write_site

EPOCH_KEYS = ("train_loss", "val_loss", "val_auc", "seconds")


def _train(tmp_path: Path, *settings: str) -> Path:
    site = write_site(tmp_path / "site-a", n_patients=16)
    run = tmp_path / "run"
    args = ["train", "--data", str(site), "--model", "abmil", "--epochs", "3", "--out", str(run)]
    for s in settings:
        args += ["--set", s]
    assert main(args) == 0
    return run


def test_mlflow_logs_epochs_config_and_model_of_a_training_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's own default would write ./mlruns here
    run = _train(tmp_path, "tracking.backend=mlflow")
    client = MlflowClient(tracking_uri=default_mlflow_uri(run))
    experiment = client.get_experiment_by_name("micromil")
    (logged,) = client.search_runs([experiment.experiment_id])
    run_id = logged.info.run_id
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.tags["micromil.kind"] == "train"
    assert logged.data.params["model.name"] == "abmil"
    assert logged.data.params["train.epochs"] == "3"
    assert not any(k.startswith("tracking.") for k in logged.data.params)

    history = json.loads((run / "history.json").read_text())
    assert len(history) >= 1
    for key in EPOCH_KEYS:
        expected = [(row["epoch"], row[key]) for row in history if row[key] is not None]
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert sorted(got) == expected, key
    metrics = json.loads((run / "metrics.json").read_text())
    assert logged.data.metrics["best_epoch"] == metrics["best_epoch"]
    assert logged.data.metrics["n_train"] == metrics["n_train"]

    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"model.pt", "metrics.json", "history.json", "curves.png", "config.json"} <= names
    copy = Path(client.download_artifacts(run_id, "model.pt", str(tmp_path / "dl")))
    assert copy.read_bytes() == (run / "model.pt").read_bytes()
    config = json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path / "dl"))).read_text())
    assert config["model"]["name"] == "abmil"
    assert (run / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_tensorboard_event_files_hold_the_epochs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path, "tracking.backend=tensorboard")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    history = json.loads((run / "history.json").read_text())
    expected = [(row["epoch"], row["train_loss"]) for row in history]
    got = [(s.step, s.value) for s in events.Scalars("train_loss")]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32


def test_tracking_is_off_by_default_and_leaves_no_files(tmp_path, monkeypatch):
    assert load_config().tracking.backend == "none"
    monkeypatch.chdir(tmp_path)
    run = _train(tmp_path)
    assert {"mlflow.db", "mlartifacts", "tensorboard"}.isdisjoint(p.name for p in run.iterdir())
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def _record() -> RoundRecord:
    return RoundRecord(
        round=2, wall_seconds=1.5, bytes_sent=100, bytes_received=200,
        train={"site-a": {"train_loss": 0.5, "num-examples": 8}},
        train_aggregated={"train_loss": 0.5, "num-examples": 8},
        evaluate={"site-a": {"auc": math.nan, "suppressed": ["auc"], "min_patients": 5}},
        evaluate_aggregated={"loss": 0.7, "suppressed": ["auc"], "min_patients": 5},
        holdout={"site-h": {"auc": 0.8, "roc_fpr": [0.0, 1.0], "num-examples": 9}},
        holdout_aggregated={"auc": 0.8, "loss": 0.6, "num-examples": 9, "flag": True},
        failures=["round 2: site-b timed out"], rejected={"train": {"site-b": "too large"}},
        central_dp={"epsilon": 3.0, "note": "rdp"},
    )


def test_round_metrics_keep_finite_aggregates_only():
    assert round_metrics(_record()) == {
        "train/train_loss": 0.5, "train/num-examples": 8.0,
        "sites/site-a/train/train_loss": 0.5, "sites/site-a/train/num-examples": 8.0,
        "val/loss": 0.7, "val/min_patients": 5.0, "sites/site-a/val/min_patients": 5.0,
        "holdout/auc": 0.8, "holdout/loss": 0.6, "holdout/num-examples": 9.0,
        "sites/site-h/holdout/auc": 0.8, "sites/site-h/holdout/num-examples": 9.0,
        "central_dp/epsilon": 3.0,
        "round/wall_seconds": 1.5, "round/bytes_sent": 100.0, "round/bytes_received": 200.0,
        "round/failures": 1.0, "round/rejected": 1.0, "round/stopped_for_privacy": 0.0,
    }


def test_federation_rounds_and_outputs_reach_mlflow(tmp_path):
    # The coordinator's hook (server/federation.py) without a simulation: the same calls.
    from mlflow import MlflowClient

    out = tmp_path / "federation"
    out.mkdir()
    (out / "metrics.json").write_text("{}\n")
    cfg = build_config({"tracking": {"backend": "mlflow", "experiment": "fl"}})
    with open_tracker(cfg, out, "federation") as tracker:
        for rnd in (1, 2):
            tracker.log_metrics(rnd, round_metrics(RoundRecord(rnd, holdout_aggregated={"auc": 0.5 + rnd / 10})))
        log_outputs(tracker, out)
    client = MlflowClient(tracking_uri=default_mlflow_uri(out))
    (logged,) = client.search_runs([client.get_experiment_by_name("fl").experiment_id])
    history = client.get_metric_history(logged.info.run_id, "holdout/auc")
    assert [(m.step, m.value) for m in history] == [(1, 0.6), (2, 0.7)]
    assert [f.path for f in client.list_artifacts(logged.info.run_id)] == ["config.json", "metrics.json"]
    assert logged.data.tags["micromil.kind"] == "federation"


def test_a_failed_run_is_marked_failed(tmp_path):
    from mlflow import MlflowClient

    cfg = build_config({"tracking": {"backend": "mlflow"}})
    with pytest.raises(RuntimeError), open_tracker(cfg, tmp_path, "federation"):
        raise RuntimeError("a site vanished")
    client = MlflowClient(tracking_uri=default_mlflow_uri(tmp_path))
    (logged,) = client.search_runs([client.get_experiment_by_name("micromil").experiment_id])
    assert logged.info.status == "FAILED"


@pytest.mark.parametrize(
    "section, words",
    [
        ({"backend": "wandb"}, "none, mlflow, tensorboard"),
        ({"experiment": " "}, "tracking.experiment"),
        ({"backend": "mlflow", "uri": "https://me:secret@mlflow.example:5000"}, "MLFLOW_TRACKING_PASSWORD"),
    ],
)
def test_bad_tracking_settings_are_refused(section, words):
    with pytest.raises(ConfigError, match=words):
        build_config({"tracking": section})


def test_a_missing_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = build_config({"tracking": {"backend": "mlflow"}})
    with pytest.raises(ConfigError, match=r'pip install "micromil-fl\[tracking\]"'):
        open_tracker(cfg, tmp_path, "train")
    assert not (tmp_path / "mlflow.db").exists()


def test_params_are_the_flattened_config_without_the_tracking_section():
    cfg = build_config({"model": {"name": "abmil", "params": {"attn_dim": 8}},
                        "data": {"classes": ["a", "b"]}, "tracking": {"backend": "mlflow"}})
    params = flatten_config(cfg.to_dict())
    assert params["model.name"] == "abmil" and params["model.params.attn_dim"] == "8"
    assert params["data.classes"] == '["a", "b"]' and params["data.encoder"] == "null"
    assert params["privacy.central.mode"] == "none"
    assert not any(k.startswith("tracking") for k in params)
