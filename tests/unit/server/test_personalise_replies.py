"""The coordinator's screen of a site's answer to the personalise message (and the record
and list rules it shares with evaluation replies): a hostile or broken site cannot slip
weights, per-patient lists or nonsense numbers into the coordinator's records."""

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from micromil_core.federated import wire
from server.rounds import ReplyChecks

CHECKS = ReplyChecks(10.0, {"h1": 40})
GOOD = {wire.NUM_EXAMPLES: 30, wire.NUM_VAL: 8, "seconds": 1.5, wire.PERSONAL_EPOCH: 3,
        "val_auc_global": 0.7, "val_auc_personal": 0.8, wire.MIN_PATIENTS: 5}


def _reply(metrics=None, **records):
    content = RecordDict({wire.METRICS: MetricRecord(GOOD if metrics is None else metrics)})
    for name, record in records.items():
        content[name] = record
    return SimpleNamespace(content=content)


def test_an_honest_reply_passes():
    assert CHECKS.personal_problem("h1", _reply(), max_epoch=20) is None
    # Chosen by 5-fold CV over 38 of the site's 40 patients (training + validation).
    cv = {**GOOD, wire.PERSONAL_FOLDS: 5, wire.NUM_VAL: 38}
    assert CHECKS.personal_problem("h1", _reply(cv), max_epoch=20) is None


def test_more_folds_than_the_federation_asked_for_are_refused():
    cv = {**GOOD, wire.PERSONAL_FOLDS: 9, wire.NUM_VAL: 38}
    problem = CHECKS.personal_problem("h1", _reply(cv), max_epoch=20, max_folds=5)
    assert problem is not None and "not a count in [0, 5]" in problem


@pytest.mark.parametrize("reply, why", [
    (_reply(arrays=ArrayRecord({"head.weight": torch.zeros(2, 3)})), "arrays"),
    (_reply(extra=ConfigRecord({"w": b"\x00" * 4096})), "records the protocol does not have"),
    (_reply(more=MetricRecord({"x": [0.1] * 50})), "records the protocol does not have"),
    (_reply({**GOOD, wire.PERSONAL_EPOCH: [0.5] * 5000}), "list of 5000"),
    (_reply({**GOOD, "val_auc_global": 5.0}), "outside [0, 1]"),
    (_reply({**GOOD, "val_auc_personal": -3.0}), "outside [0, 1]"),
    (_reply({**GOOD, wire.PERSONAL_EPOCH: 2.5}), "not a count"),
    (_reply({**GOOD, wire.PERSONAL_EPOCH: -1}), "not a count"),
    (_reply({**GOOD, wire.PERSONAL_EPOCH: 999}), "not a count in [0, 20]"),
    (_reply({**GOOD, wire.NUM_VAL: 1e9}), "not a count in [0, 40]"),
    (_reply({**GOOD, wire.PERSONAL_FOLDS: 2.5}), "not a count"),
    (_reply({**GOOD, wire.PERSONAL_FOLDS: 1e6}), "not a count in [0, 40]"),
    (_reply({**GOOD, "seconds": -4.0}), "negative"),
    (_reply({**GOOD, "per_patient_probs": 0.3}), "unexpected metric keys"),
    (_reply({k: v for k, v in GOOD.items() if k != wire.NUM_EXAMPLES}), "not a patient count"),
])
def test_a_hostile_reply_is_refused_and_said_why(reply, why):
    problem = CHECKS.personal_problem("h1", reply, max_epoch=20)
    assert problem is not None and why in problem


def test_evaluation_replies_follow_the_same_record_and_list_rules():
    ok = {wire.NUM_EXAMPLES: 10, "auc": 0.8, "roc_fpr": [0.0] * len(wire.ROC_GRID)}
    assert CHECKS.evaluate_problem("h1", _reply(ok)) is None
    assert "records" in CHECKS.evaluate_problem("h1", _reply(ok, side=ConfigRecord({"ids": "p001"})))
    assert "list of 3" in CHECKS.evaluate_problem("h1", _reply({**ok, "auc": [0.1, 0.2, 0.3]}))
    assert "list of 3" in CHECKS.evaluate_problem("h1", _reply({**ok, "roc_fpr": [0.0, 0.5, 1.0]}))


def test_a_site_with_its_own_dp_refuses_local_head_before_round_one(tmp_path):
    """A hospital may turn DP-SGD on in its own site.yaml, unknown to the coordinator's
    config: it says so in its description, and local-head is refused before round 1."""
    from micromil_core.config import build_config
    from micromil_core.errors import ConfigError
    from micromil_core.federated.site_task import SiteSettings, describe_site
    from micromil_core.privacy.settings import LocalPrivacyConfig
    from server.discovery import site_info
    from server.federation import check_sites
    from tests.conftest import write_site

    dp = LocalPrivacyConfig(mode="dp-sgd", target_epsilon=8.0, delta=1e-3)
    sites = [
        site_info(i, *describe_site(SiteSettings(name, write_site(tmp_path / name, 24, seed=i),
                                                 privacy=privacy, state_dir=tmp_path / "s"), build_config().data))
        for i, (name, privacy) in enumerate([("h1", LocalPrivacyConfig()), ("h2", dp)])
    ]
    assert [s.privacy for s in sites] == ["none", "dp-sgd"]
    cfg = build_config({"model": {"name": "abmil"}, "federation": {"personalise": "local-head"}})
    with pytest.raises(ConfigError, match=r"local-head.*DP-SGD sites: h2"):
        check_sites(sites, cfg)
    check_sites(sites, build_config({"model": {"name": "abmil"}, "federation": {"personalise": "finetune"}}))


def test_simulate_says_what_each_site_chose(tmp_path):
    from micromil_core.report.personal import choice_criterion
    from server.simulation_cli import personal_lines

    metrics = {"personalised": {"method": "finetune", "failures": ["site-9: not connected"],
                                "chosen_by": choice_criterion("loss", class_weighting=True),
                                "per_site": {
        "site-0": {"val_auc_global": 0.7, "val_auc_personal": 0.6, "personal_epoch": 4, "personal_folds": 5},
        "site-1": {"val_auc_global": 0.9, "val_auc_personal": 0.9, "personal_epoch": 0},
        "site-2": {"suppressed": ["val_auc_global", "val_auc_personal", "personal_epoch", "personal_folds"],
                   "min_patients": 5},
    }}}
    text = "\n".join(personal_lines(metrics, tmp_path))
    # A lower AUC can win under select_on: loss; the line says what the choice maximised.
    assert "site-0: CV AUC global 0.700 -> personal 0.600 (epoch 4, chosen by class-weighted loss)" in text
    assert "site-1: validation AUC global 0.900 -> personal 0.900 (the global model, chosen by" in text
    assert "site-2: CV AUC global suppressed (n < 5)" in text and "(choice withheld)" in text
    assert "site-9: not connected" in text and personal_lines({}, tmp_path) == []
    # The words follow the settings: an unweighted loss is not called class-weighted.
    assert [choice_criterion("loss", False), choice_criterion("auc", False), choice_criterion(None)] == \
        ["loss", "AUC", None]
