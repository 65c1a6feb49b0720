"""prepare -> check-site -> train -> evaluate (--explain) -> cv through the real CLI on
real data (UCSB breast-cancer TMA features, MUSK1). Few epochs: this checks plumbing and
outputs; accuracy claims live in benchmarks/."""

import csv
import hashlib
import json

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from micromil_core.cli import main
from micromil_core.data.data_root import read_sites_yaml
from micromil_core.training.checkpoint import load_checkpoint
from micromil_core.training.metrics import METRIC_KEYS
from tests.heldout import pairwise_auc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ucsb(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ucsb"
    code = main(["datasets", "prepare", "ucsb-breast", "--out", str(root), "--sites", "3",
                 "--holdout-sites", "1", "--partition", "dirichlet:0.5", "--seed", "0"])
    assert code == 0
    return root


def test_prepare_train_evaluate_explain(ucsb, tmp_path, capsys):
    info = read_sites_yaml(ucsb)
    assert [s.name for s in info.train_sites] == ["site-0", "site-1", "site-2"]
    assert [s.name for s in info.holdout_sites] == ["site-3"]
    assert main(["check-site", str(ucsb / "site-3")]) == 0
    run = tmp_path / "pooled"
    assert main(["train", "--data-root", str(ucsb), "--model", "micromil", "--epochs", "3",
                 "--set", "model.params.n_clusters=8", "--set", "train.num_threads=1",
                 "--out", str(run)]) == 0
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt.model_name == "micromil" and ckpt.params["n_clusters"] == 8
    assert ckpt.config["train"]["epochs"] == 3 and ckpt.scaler is not None
    assert set(ckpt.provenance["trained_on"]) == {"site-0", "site-1", "site-2"}
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    capsys.readouterr()
    assert main(["inspect", str(run / "model.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()
    assert info["model"] == "micromil" and info["classes"] == ["negative", "positive"]
    assert info["training"]["trained_on"] == ["site-0", "site-1", "site-2"]
    assert info["parameters"] == sum(t.numel() for t in ckpt.state_dict.values())
    assert main(["inspect", str(run / "model.pt")]) == 0
    assert "trained on site-0, site-1, site-2" in capsys.readouterr().out
    assert (run / "curves.png").stat().st_size > 0 and (run / "roc.png").stat().st_size > 0

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data-root", str(ucsb),
                 "--explain", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert (out / "calibration.png").is_file()
    low, high = metrics["ci95"]["auc"]  # bootstrap over the held-out patients
    assert low <= metrics["auc"] <= high and "ci95" in metrics["per_site"]["site-3"]
    assert list(metrics["per_site"]) == ["site-3"]
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    n_holdout = sum(1 for _ in open(ucsb / "site-3" / "patients.csv")) - 1
    assert len(rows) == n_holdout == metrics["n"]
    assert {"prob_negative", "prob_positive"} <= set(rows[0])
    # The metrics are those of the per-patient predictions written beside them.
    classes = ["negative", "positive"]
    y = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert metrics["decision"] == "argmax"
    assert metrics["accuracy"] == pytest.approx((probs.argmax(axis=1) == y).mean(), abs=1e-9)
    assert metrics["auc"] == pytest.approx(pairwise_auc(y, probs), abs=1e-9)
    assert metrics["calibration"]["brier"] == pytest.approx(brier_score_loss(y, probs[:, 1]), abs=1e-9)
    gallery = out / "explain" / "site-3"
    assert (gallery / "index.html").is_file()
    assert len(list(gallery.glob("*.png"))) == n_holdout
    assert (out / "roc.png").is_file()
    printed = capsys.readouterr().out
    assert "site-3" in printed and "metrics.json" in printed

    # The same held-out patients, scored as new patients whose diagnosis is not known:
    # patients.csv lists ids only. Same probabilities as evaluate, decision = argmax.
    new = tmp_path / "new-patients"
    new.mkdir()
    (new / "features").symlink_to((ucsb / "site-3" / "features").resolve())
    ids = [r["patient_id"] for r in rows]
    (new / "patients.csv").write_text("patient_id\n" + "\n".join(ids) + "\n")
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(new),
                 "--out", str(tmp_path / "x")]) == 2
    assert "micromil predict" in capsys.readouterr().err
    pred = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "model.pt"), "--data", str(new),
                 "--explain", "--out", str(pred)]) == 0
    with open(pred / "predictions.csv") as fh:
        scored = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in scored] == ids
    for s, e in zip(scored, rows, strict=True):
        probs = {c: float(s[f"prob_{c}"]) for c in ("negative", "positive")}
        assert probs["positive"] == pytest.approx(float(e["prob_positive"]), abs=1e-6)
        assert s["predicted"] == max(probs, key=probs.get) and s["label"] == ""
    summary = json.loads((pred / "summary.json").read_text())
    assert sum(summary["per_site"]["new-patients"]["predicted"].values()) == len(ids)
    assert not any(pid in json.dumps(summary) for pid in ids)  # counts only, no ids
    assert len(list((pred / "explain" / "new-patients").glob("*.png"))) == len(ids)
    assert f"new-patients: {len(ids)} patients scored" in capsys.readouterr().out

    # A fixed operating point: every decision and metric follows P(positive) >= threshold.
    p_pos = np.array([float(e["prob_positive"]) for e in rows])
    y = np.array([e["label"] == "positive" for e in rows], dtype=int)
    threshold = float(np.median(p_pos))
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data-root", str(ucsb),
                 "--threshold", str(threshold), "--out", str(tmp_path / "at")]) == 0
    at = json.loads((tmp_path / "at" / "metrics.json").read_text())
    called = p_pos >= threshold
    assert at["sensitivity"] == pytest.approx(called[y == 1].mean())
    assert at["specificity"] == pytest.approx(1 - called[y == 0].mean())
    assert at["auc"] == pytest.approx(metrics["auc"]) and "P(positive) >=" in at["decision"]
    assert [o["target"] for o in metrics["operating_points"]] == [0.90, 0.95]
    for point in metrics["operating_points"]:  # the threshold that reaches each target
        assert point["sensitivity"] >= point["target"]
        assert point["sensitivity"] == pytest.approx((p_pos[y == 1] >= point["threshold"]).mean())
    assert main(["predict", "--model", str(run / "model.pt"), "--data", str(new),
                 "--threshold", str(threshold), "--out", str(tmp_path / "pred-at")]) == 0
    with open(tmp_path / "pred-at" / "predictions.csv") as fh:
        decided = [r["predicted"] == "positive" for r in csv.DictReader(fh)]
    assert decided == called.tolist()
    assert main(["predict", "--model", str(run / "model.pt"), "--data", str(new),
                 "--threshold", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "a probability in [0, 1]" in capsys.readouterr().err

    # Recalibration on the training hospitals' validation patients: a new model.pt whose
    # probabilities evaluate and predict use; same ranking, so the same AUC.
    val_sites = [str(ucsb / f"site-{i}") for i in range(3)]
    calibrated = tmp_path / "calibrated.pt"
    assert main(["calibrate", "--model", str(run / "model.pt"), "--data", *val_sites,
                 "--out", str(run / "model.pt")]) == 2  # never overwrites the original
    assert main(["calibrate", "--model", str(run / "model.pt"), "--data", *val_sites,
                 "--split", "test", "--out", str(calibrated)]) == 2
    assert "test split" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(run / "model.pt"), "--data", *val_sites,
                 "--out", str(calibrated)]) == 0
    assert "platt calibration" in capsys.readouterr().out
    recal = load_checkpoint(calibrated)
    assert recal.calibration["method"] == "platt" and len(recal.calibration["params"]) == 2
    assert recal.provenance["calibrated_on"]["sites"] == ["site-0", "site-1", "site-2"]
    assert main(["evaluate", "--model", str(calibrated), "--data-root", str(ucsb),
                 "--out", str(tmp_path / "ev-cal")]) == 0
    after = json.loads((tmp_path / "ev-cal" / "metrics.json").read_text())
    assert after["auc"] == pytest.approx(metrics["auc"])
    with open(tmp_path / "ev-cal" / "predictions.csv") as fh:
        p_after = np.array([float(r["prob_positive"]) for r in csv.DictReader(fh)])
    assert not np.allclose(p_after, p_pos)
    assert main(["inspect", str(calibrated)]) == 0
    assert "recalibrated (platt" in capsys.readouterr().out

    # Two models on the same patients, paired: recalibration keeps the ranking, so the
    # AUC difference is exactly 0 while accuracy may move.
    assert main(["evaluate", "--model", str(calibrated), "--against", str(run / "model.pt"),
                 "--data-root", str(ucsb), "--out", str(tmp_path / "vs")]) == 0
    vs = json.loads((tmp_path / "vs" / "metrics.json").read_text())["against"]
    for value in vs["difference"]["auc"].values():
        assert value == pytest.approx(0.0, abs=1e-9)
    assert vs["difference"]["accuracy"]["difference"] == pytest.approx(
        after["accuracy"] - metrics["accuracy"]
    )
    assert vs["metrics"]["auc"] == pytest.approx(metrics["auc"])
    assert "on the same patients (paired bootstrap)" in capsys.readouterr().out


def test_cv_same_folds_and_resume(tmp_path, monkeypatch):
    data = tmp_path / "musk1"
    assert main(["datasets", "prepare", "musk1", "--out", str(data)]) == 0
    out = tmp_path / "cv"
    args = ["cv", "--data", str(data / "site-0"), "--model", "gated-abmil", "--folds", "3",
            "--epochs", "2", "--seed", "0", "--set", "train.num_threads=1", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert f"{key}_mean" in summary and f"{key}_std" in summary
    assert len(summary["per_fold"]) == 3
    assert sum(m["n"] for m in summary["per_fold"]) == 92  # every bag tested exactly once

    # A re-run with the same settings reuses the finished folds instead of training again.
    import micromil_core.training.cv as cv_module

    def boom(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(cv_module, "train_and_select", boom)
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["auc_mean"] == summary["auc_mean"]


@pytest.mark.parametrize("command", [["datasets", "list"], ["models"], ["encoders"]])
def test_listing_commands(command, capsys):
    assert main(command) == 0
    out = capsys.readouterr().out
    expected = {"datasets": "fashion-bags:standard/", "models": "gated-abmil", "encoders": "histo-texture"}
    assert expected[command[0]] in out
