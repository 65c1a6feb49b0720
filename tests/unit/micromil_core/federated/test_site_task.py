"""The site side of a round, without Flower: aggregate outputs only, FedProx, redaction."""

import math

import pytest
import torch

from micromil_core.config import DataConfig, TrainConfig, build_config
from micromil_core.data.scaler import FeatureScaler
from micromil_core.errors import SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.messages import RoundSettings
from micromil_core.federated.site_task import (
    ModelSpec,
    SiteSettings,
    describe_site,
    evaluate_round,
    feature_moments,
    load_runtime,
    proximal_term,
    redact,
    round_seed,
    train_round,
)
from tests.conftest import write_site

SPEC = ModelSpec("micromil", 6, 2, {"n_clusters": 4, "top_k": 2})
CFG = TrainConfig(epochs=1, lr=1e-2)


def _runtime(tmp_path, role="train", **kw):
    site = SiteSettings("h1", write_site(tmp_path / "h1", n_patients=16, **kw), role)
    return load_runtime(site, DataConfig(), CFG, ["benign", "malignant"])


def test_redact_whole_ids_only():
    text = "row 3: p001 has NaN; p0011 fine"
    assert redact(text, ["p001"]) == "row 3: <patient> has NaN; p0011 fine"


def test_redact_hides_slide_and_image_names():
    # Slide names often extend the patient's barcode, which the whole-id rule keeps.
    text = ("features/TCGA-AB-1234/TCGA-AB-1234-01Z.h5: feature dimension 512 differs from "
            "768 of TCGA-AB-1234-02Z.pt, another slide; re-extract TCGA-AB-1234-01Z.h5; "
            "images/TCGA-AB-1234/scan 1/tile_0003.PNG unreadable; model.yaml is fine")
    out = redact(text, ["TCGA-AB-1234"])
    assert "TCGA" not in out and "tile_0003" not in out
    assert out.startswith("features/<patient>/<file>: feature dimension 512 differs from 768 of <file>")
    assert "model.yaml is fine" in out


def test_describe_site_is_aggregate(tmp_path):
    site_dir = write_site(tmp_path / "h1", n_patients=10)
    torch.save(torch.full((2, 6), float("nan")), site_dir / "features" / "p003.pt")
    description, counts = describe_site(SiteSettings("h1", site_dir), DataConfig())
    assert description[wire.SITE_NAME] == "h1" and description[wire.SITE_CLASSES] == ["benign", "malignant"]
    assert counts[wire.NUM_EXAMPLES] == 10 and counts["feature_dim"] == 6
    assert counts["num_errors"] >= 1
    text = " ".join(description[wire.SITE_PROBLEMS])
    assert "p003" not in text and "<patient>" in text and str(site_dir) not in text
    assert set(counts) <= wire.ALLOWED_SITE_METRICS


def test_train_round_changes_weights_and_reports_aggregates(tmp_path):
    rt = _runtime(tmp_path)
    state = {k: v.clone() for k, v in SPEC.build().state_dict().items()}
    new_state, metrics = train_round(rt, SPEC, state, CFG, None, server_round=1, local_epochs=1)
    assert set(new_state) == set(state)
    assert any(not torch.equal(new_state[k], state[k]) for k in state)
    assert set(metrics) <= wire.ALLOWED_TRAIN_METRICS
    assert metrics[wire.NUM_EXAMPLES] == len(rt.train)
    again, _ = train_round(rt, SPEC, state, CFG, None, server_round=1, local_epochs=1)
    assert all(torch.equal(again[k], new_state[k]) for k in state)  # seeded per round and site


def test_holdout_site_never_trains(tmp_path):
    rt = _runtime(tmp_path, role="holdout")
    with pytest.raises(SiteDataError, match="held-out"):
        train_round(rt, SPEC, SPEC.build().state_dict(), CFG, None, 1, 1)


def test_evaluate_round_shares_roc_on_fixed_grid_only(tmp_path):
    rt = _runtime(tmp_path, role="holdout")
    metrics = evaluate_round(rt, SPEC, SPEC.build().state_dict(), None)
    assert set(metrics) <= wire.ALLOWED_EVAL_METRICS
    assert metrics[wire.NUM_EXAMPLES] == 16  # held-out sites are judged on every patient
    assert metrics["roc_fpr"] == pytest.approx(list(wire.ROC_GRID))
    assert len(metrics["roc_tpr"]) == len(wire.ROC_GRID) != 16
    # The AUC travels with its bootstrap interval over the same 16 patients: two numbers.
    assert 0.0 <= metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"] <= 1.0


def test_proximal_term_is_zero_at_reference_and_grows():
    model = SPEC.build()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    term = proximal_term(model, ref, mu=0.5)
    assert float(term(model)) == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    n = next(model.parameters()).numel()
    assert float(term(model)) == pytest.approx(0.5 * 0.5 * n)


def test_moments_build_the_same_scaler_as_pooled_fit(tmp_path):
    rt = _runtime(tmp_path)
    total, total_sq, count = feature_moments(rt)
    a = FeatureScaler.from_moments(total, total_sq, count)
    b = FeatureScaler.fit(rt.train)
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)


def test_round_settings_round_trip():
    cfg = build_config({"model": {"name": "micromil", "params": {"n_clusters": 4}}, "train": {"lr": 0.01}})
    scaler = FeatureScaler(torch.arange(3.0), torch.ones(3))
    s = RoundSettings(cfg, ["a", "b"], ModelSpec("micromil", 3, 2, {"n_clusters": 4}), scaler)
    back = RoundSettings.from_config(s.to_config())
    assert back.experiment == cfg and back.classes == ["a", "b"] and back.spec == s.spec
    assert torch.equal(back.scaler.mean, scaler.mean)


def test_round_settings_parse_a_run_s_text_once_and_hand_out_their_own_params():
    cfg = build_config({"model": {"name": "micromil", "params": {"n_clusters": 4}}, "train": {"lr": 0.01}})
    config = RoundSettings(cfg, ["a", "b"], ModelSpec("micromil", 3, 2, {"n_clusters": 4})).to_config()
    first, second = RoundSettings.from_config(config), RoundSettings.from_config(config)
    assert first.experiment is second.experiment  # parsed once: frozen, so shared safely
    first.spec.params["n_clusters"] = 99  # a handler changing its copy changes no other message
    assert second.spec.params == {"n_clusters": 4} == RoundSettings.from_config(config).spec.params
    changed = dict(config, **RoundSettings(build_config({"train": {"lr": 0.5}}), ["a", "b"]).to_config())
    assert RoundSettings.from_config(changed).experiment.train.lr == 0.5  # another text, parsed anew


def test_round_seed_differs_by_round_and_site():
    seeds = {round_seed(0, r, s) for r in (1, 2) for s in ("a", "b")}
    assert len(seeds) == 4 and not math.isnan(round_seed(0, 1, "a"))
