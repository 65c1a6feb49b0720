"""Small-count guard (micromil_core.privacy.disclosure): which metric leaves a site."""

import numpy as np
import pytest

from micromil_core.config import LocalPrivacyConfig, PrivacyConfig, build_config
from micromil_core.errors import ConfigError
from micromil_core.federated import wire
from micromil_core.federated.site_task import ModelSpec, evaluate_round
from micromil_core.privacy.disclosure import effective_min_patients, guard, withheld_names
from micromil_core.privacy.node_config import from_node_config, to_node_config

FULL = {"auc": 0.8, "accuracy": 0.7, "balanced_accuracy": 0.7, "f1": 0.6, "sensitivity": 0.5,
        "specificity": 0.9, "loss": 0.4, "auc_ci_low": 0.6, "auc_ci_high": 0.9,
        "roc_fpr": [0.0, 1.0], "roc_tpr": [0.0, 1.0], wire.NUM_EXAMPLES: 0}


def _released(labels, k=5, fine=()):
    labels = list(labels)
    out = guard({**FULL, wire.NUM_EXAMPLES: len(labels)}, wire.EVAL_METRIC_KEYS, k, len(labels),
                labels, 2, fine)
    return set(out) & set(wire.EVAL_METRIC_KEYS), out


def test_one_patient_releases_nothing_but_the_count():
    released, out = _released([1])
    assert released == set()
    assert out[wire.NUM_EXAMPLES] == 1 and out[wire.MIN_PATIENTS] == 5
    assert sorted(withheld_names(out[wire.SUPPRESSED])) == sorted(set(FULL) - {wire.NUM_EXAMPLES})


def test_metrics_are_judged_by_the_patients_they_are_computed_over():
    # 10 negatives, 2 positives: loss/accuracy over 12 and specificity over 10 may leave;
    # sensitivity over 2 positives, and AUC/ROC/F1/balanced accuracy (smallest class 2) may not.
    released, _ = _released([0] * 10 + [1] * 2)
    assert released == {"loss", "accuracy", "specificity"}
    released, _ = _released([0] * 10 + [1] * 5)
    assert released == set(FULL) - {wire.NUM_EXAMPLES}


def test_a_site_may_raise_the_threshold():
    released, out = _released([0] * 10 + [1] * 5, k=20)
    assert released == set() and out[wire.MIN_PATIENTS] == 20


def test_fine_level_metrics_are_guarded_by_fine_labelled_patients():
    fine_full = {"fine_accuracy": 0.5, "fine_balanced_accuracy": 0.5, "fine_macro_f1": 0.5, "fine_auc": 0.5}
    labels = [0] * 10 + [1] * 10
    fine = [0] * 6 + [1] * 3 + [-1] * 11  # 9 patients with a fine label, smallest fine class 3
    out = guard({**fine_full, wire.FINE_COUNT: 9}, wire.EVAL_METRIC_KEYS, 5, 20, labels, 2, fine)
    assert set(out) & set(fine_full) == {"fine_accuracy"}
    out = guard({**fine_full, wire.FINE_COUNT: 3}, wire.EVAL_METRIC_KEYS, 5, 20, labels, 2, [0, 1, 1])
    assert set(out) & set(fine_full) == set()


def test_the_stricter_threshold_wins_and_lowering_needs_confirmation(caplog):
    site, coordinator = LocalPrivacyConfig(min_patients=12), PrivacyConfig(min_patients=5)
    assert effective_min_patients(site, coordinator) == 12
    assert effective_min_patients(LocalPrivacyConfig(), PrivacyConfig(min_patients=30)) == 30
    with pytest.raises(ConfigError, match="min_patients=2 is below 5.*allow_small_counts: true"):
        build_config({"privacy": {"min_patients": 2}})
    low = LocalPrivacyConfig(min_patients=2, allow_small_counts=True)
    # The coordinator alone cannot lower a site's threshold: the site keeps its default 5.
    assert effective_min_patients(LocalPrivacyConfig(), low) == 5
    with caplog.at_level("WARNING"):
        assert effective_min_patients(low, low) == 2
    assert "lowered to 2 patients" in caplog.text


def test_site_threshold_travels_in_the_node_config_with_dp_off():
    raised = LocalPrivacyConfig(min_patients=10)
    entries = to_node_config(raised)
    assert entries == {"privacy-min-patients": 10}
    assert from_node_config(entries) == raised


def test_evaluate_round_on_real_bags_withholds_per_class_metrics(musk1_runtime):
    runtime, spec, state = musk1_runtime
    labels = np.array([b.label for b in runtime.evaluation_bags])
    n_pos = int((labels == 1).sum())
    out = evaluate_round(runtime, spec, state, None, min_patients=n_pos + 1)
    assert "sensitivity" not in out and "auc" not in out and "roc_tpr" not in out
    assert "loss" in out and "accuracy" in out  # computed over all the site's patients
    assert "sensitivity" in withheld_names(out[wire.SUPPRESSED])
    full = evaluate_round(runtime, spec, state, None, min_patients=1)
    assert {"sensitivity", "auc", "roc_tpr"} <= set(full)


@pytest.fixture
def musk1_runtime(tmp_path):
    from micromil_core.cli import main
    from micromil_core.federated.setup import initial_model_state
    from micromil_core.federated.site_task import SiteSettings, load_runtime

    root = tmp_path / "musk1"
    assert main(["datasets", "prepare", "musk1", "--out", str(root), "--sites", "1",
                 "--holdout-sites", "1", "--partition", "iid", "--seed", "0"]) == 0
    cfg = build_config({})
    site = SiteSettings("site-1", root / "site-1", "holdout")
    runtime = load_runtime(site, cfg.data, cfg.train, ["negative", "positive"])
    dim = runtime.loaded.bags[0].features.shape[1]
    spec = ModelSpec("abmil", dim, 2, {})
    return runtime, spec, initial_model_state(spec, 0)
