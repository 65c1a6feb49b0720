"""What the coordinator refuses before aggregating (micromil_core.federated.validation),
and the binding of a node to the site name its key was registered for."""

import numpy as np
import pytest

from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.setup import SiteInfo, check_identities
from micromil_core.federated.validation import metrics_problem, update_problem, update_ratio
from server.app import parse_site_nodes
from tests.hostile import ARRAY_FAULTS, EXPECTED_REASON

GLOBAL = {"proj.weight": np.full((4, 3), 0.5, np.float32), "head.bias": np.zeros(2, np.float32),
          "steps": np.array(3, np.int64)}


def _honest():
    return {k: (v + 0.01).astype(v.dtype) if v.dtype.kind == "f" else v.copy() for k, v in GLOBAL.items()}


def test_an_honest_update_passes():
    assert update_problem(GLOBAL, _honest(), max_update_ratio=10.0) is None


def test_the_update_ratio_is_the_float64_norm_ratio():
    rng = np.random.default_rng(0)
    reference = {"w": rng.normal(size=(300, 200)).astype(np.float32), "h": rng.normal(size=50).astype(np.float16),
                 "n": np.array(7, np.int64)}
    update = {"w": reference["w"] + rng.normal(scale=1e-3, size=(300, 200)).astype(np.float32),
              "h": (reference["h"] + 0.5).astype(np.float16), "n": np.array(9, np.int64)}
    floats = [k for k in reference if reference[k].dtype.kind == "f"]  # the counter is not a weight
    diff = np.concatenate([(update[k].astype(np.float64) - reference[k].astype(np.float64)).ravel() for k in floats])
    ref = np.concatenate([reference[k].astype(np.float64).ravel() for k in floats])
    assert update_ratio(reference, update) == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(ref), rel=1e-6)


@pytest.mark.parametrize("fault", sorted(ARRAY_FAULTS))
def test_each_array_fault_is_refused_with_its_reason(fault):
    bad = ARRAY_FAULTS[fault](_honest(), GLOBAL)
    reason = update_problem(GLOBAL, bad, max_update_ratio=10.0)
    assert reason is not None and EXPECTED_REASON[fault] in reason, reason


def test_the_norm_bound_is_relative_to_the_global_model_and_can_be_off():
    big = {k: (v * 30).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in GLOBAL.items()}
    assert "29x the global model's norm" in update_problem(GLOBAL, big, 10.0)
    assert update_problem(GLOBAL, big, 0.0) is None  # 0 = no bound
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}  # an all-zero start counts as norm 1
    assert update_problem(zero, _honest(), 10.0) is None


@pytest.mark.parametrize(("metrics", "reason"), [
    ({wire.NUM_EXAMPLES: 5, "train_loss": 0.3, "secret_patient_score": 0.9}, "unexpected metric keys"),
    ({wire.NUM_EXAMPLES: 10**9, "train_loss": 0.3}, "exceeds the 40 patients"),
    ({wire.NUM_EXAMPLES: 2.5}, "not a patient count"),
    ({wire.NUM_EXAMPLES: 5, "train_loss": float("inf")}, "infinite"),
    ({wire.NUM_EXAMPLES: 5, "train_loss": -1.0}, "negative"),
    ({wire.NUM_EXAMPLES: 5, "val_auc": 7.0}, "outside [0, 1]"),
])
def test_bad_train_metrics_are_refused(metrics, reason):
    assert reason in metrics_problem(metrics, wire.ALLOWED_TRAIN_METRICS, max_examples=40)


def test_evaluation_metrics_ranges():
    grid = len(wire.ROC_GRID)
    ok = {wire.NUM_EXAMPLES: 19, "auc": 0.7, "loss": 0.6, "roc_tpr": [0.5] * grid,
          wire.SUPPRESSED: 16, wire.MIN_PATIENTS: 5}
    assert metrics_problem(ok, wire.ALLOWED_EVAL_METRICS, 19) is None
    assert "outside [0, 1]" in metrics_problem({**ok, "roc_tpr": [2.0] * grid}, wire.ALLOWED_EVAL_METRICS, 19)
    # Only ROC points on the fixed grid may be lists: not another length, not another key.
    assert "list of 3" in metrics_problem({**ok, "roc_tpr": [0.0, 0.5, 1.0]}, wire.ALLOWED_EVAL_METRICS, 19)
    assert "list of 21" in metrics_problem({**ok, "auc": [0.5] * grid}, wire.ALLOWED_EVAL_METRICS, 19)
    assert metrics_problem({**ok, "auc": float("nan")}, wire.ALLOWED_EVAL_METRICS, 19) is None


def _site(node_id, name):
    return SiteInfo(node_id, name, "train", ["a", "b"], {}, [])


def test_a_node_claiming_another_sites_name_is_refused_naming_both():
    bound = {101: "hospital-1", 102: "hospital-2"}
    check_identities([_site(101, "hospital-1"), _site(102, "hospital-2")], bound)
    with pytest.raises(SiteDataError, match="holds the key registered for 'hospital-1' but calls itself 'hospital-9'"):
        check_identities([_site(101, "hospital-9"), _site(102, "hospital-2")], bound)
    with pytest.raises(SiteDataError, match="node 555 .*holds no key registered"):
        check_identities([_site(555, "hospital-3")], bound)
    check_identities([_site(101, "anything")], None)  # no node authentication: names are claims


def test_site_nodes_run_config_parses_or_fails_clearly():
    assert parse_site_nodes('{"101": "hospital-1"}') == {101: "hospital-1"}
    assert parse_site_nodes("") is None and parse_site_nodes(None) is None
    with pytest.raises(ConfigError, match="site-nodes"):
        parse_site_nodes("[1, 2]")
