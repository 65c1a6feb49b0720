"""Personal models in a simulated federation on real data (UCSB breast TMA, 3 training
hospitals + 1 held out): what each site keeps never travels, resume keeps the personal
state, DP-SGD sites pay for fine-tuning in their ledger, and ``compare`` judges local,
global and personal models on each training site's own test patients."""

import csv
import json
from dataclasses import replace

import pytest
import torch

from micromil_core.config import PrivacyConfig
from micromil_core.errors import ConfigError
from micromil_core.training.checkpoint import load_checkpoint
from server.personalisation import PERSONALISE_MESSAGE
from server.simulation import simulate
from server.wire_log import WIRE_LOG, audit_replies, read_wire_log
from tests.conftest import patient_ids
from tests.integration.conftest import RecordingGrid, _cfg

pytestmark = pytest.mark.slow

TRAIN_SITES = ("site-0", "site-1", "site-2")


def _personal(out, site):
    """(the run's personal model, its head files) at ``site``."""
    (run_dir,) = (out / "site-state" / site / "personal").iterdir()
    heads = {p.name: torch.load(p, weights_only=True) for p in sorted(run_dir.glob("head-round-*.pt"))}
    return load_checkpoint(run_dir / "model.pt"), heads


@pytest.fixture(scope="module")
def local_head_run(demo_ucsb, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "local-head"
    log = []
    cfg = _cfg(demo_ucsb, 2, personalise="local-head", personal_epochs=3)
    metrics = simulate(cfg, out, grid_tap=lambda g: RecordingGrid(g, log))
    return out, metrics, log


def test_personal_heads_never_travel(local_head_run, demo_ucsb):
    out, metrics, log = local_head_run
    kept = []
    for site in TRAIN_SITES:
        model, heads = _personal(out, site)
        assert model.provenance["personalised"] == "local-head" and model.provenance["site"] == site
        assert set(heads) == {"head-round-0001.pt", "head-round-0002.pt"}
        kept += [t for head in heads.values() for t in head.values()]
        if model.provenance["personal_epoch"] > 0:  # 0: the site kept the global model, whose head travels
            kept += [model.state_dict[k] for k in ("head.weight", "head.bias")]
    travelled = [
        torch.from_numpy(a.numpy())
        for messages, replies in log for m in messages + replies if m.has_content()
        for record in m.content.array_records.values() for a in record.values()
    ]
    assert travelled
    for tensor in kept:  # no array of any message holds a site's own head
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in travelled)
    personal = [(m, r) for messages, replies in log for m, r in zip(messages, replies, strict=False)
                if m.metadata.message_type == PERSONALISE_MESSAGE]
    assert len(personal) == len(TRAIN_SITES)
    assert all(not r.content.array_records for _, r in personal)  # numbers only come back
    entries = read_wire_log(out / WIRE_LOG)
    model_keys = set(load_checkpoint(out / "model.pt").state_dict)
    assert audit_replies(entries, patient_ids(demo_ucsb), model_keys) > 0
    assert set(metrics["personalised"]["per_site"]) == set(TRAIN_SITES)
    assert metrics["personalised"]["failures"] == []


def test_local_head_leaves_the_global_model_as_plain_fedavg(local_head_run, full_run):
    """The site's own head is trained beside the generic one: the global model is the one
    plain FedAvg gives (the same experiment without personalisation), so held-out hospitals
    lose nothing."""
    out, _, _ = local_head_run
    a, b = load_checkpoint(out / "model.pt"), load_checkpoint(full_run[0] / "model.pt")
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key


def test_resume_keeps_the_personal_state(local_head_run, demo_ucsb, tmp_path):
    out, _, _ = local_head_run
    part = tmp_path / "interrupted"
    cfg = _cfg(demo_ucsb, 2, personalise="local-head", personal_epochs=3)
    simulate(replace(cfg, federation=replace(cfg.federation, rounds=1)), part)
    # The coordinator "crashed" after the sites had trained round 2 but before it saved it:
    # each site already holds a round-2 head, and the resumed run replays round 2.
    for site in TRAIN_SITES:
        (run_dir,) = (part / "site-state" / site / "personal").iterdir()
        head = torch.load(run_dir / "head-round-0001.pt", weights_only=True)
        torch.save({k: torch.zeros_like(v) for k, v in head.items()}, run_dir / "head-round-0002.pt")
    simulate(cfg, part, resume=True)
    for site in TRAIN_SITES:
        (whole, whole_heads), (resumed, resumed_heads) = _personal(out, site), _personal(part, site)
        # The replayed round 2 started from the head round 1 kept, as in the uninterrupted run.
        for key, value in whole_heads["head-round-0002.pt"].items():
            assert torch.allclose(value, resumed_heads["head-round-0002.pt"][key], atol=1e-6), (site, key)
        for key, value in whole.state_dict.items():
            assert torch.allclose(value, resumed.state_dict[key], atol=1e-6), (site, key)


def test_dp_sites_pay_for_fine_tuning_in_their_ledger(demo_ucsb, tmp_path):
    privacy = PrivacyConfig(mode="dp-sgd", target_epsilon=3.0, delta=1e-3)
    out = tmp_path / "dp"
    cfg = replace(_cfg(demo_ucsb, 2, personalise="finetune"), privacy=privacy)
    metrics = simulate(cfg, out)
    for site in TRAIN_SITES:
        ledger = json.loads((out / "site-state" / site / "privacy-ledger.json").read_text())
        (run,) = ledger["runs"].values()
        assert [r["round"] for r in run["rounds"]] == [1, 2, 3]  # 2 rounds + the fine-tuning
        assert run["rounds"][-1]["epsilon"] <= 3.0 + 1e-6  # the budget covered all three
        reply = metrics["personalised"]["per_site"][site]
        assert reply["epsilon"] == pytest.approx(run["rounds"][-1]["epsilon"])
        _personal(out, site)  # the personal model is there
    with pytest.raises(ConfigError, match="local-head"):  # before round 1
        simulate(replace(_cfg(demo_ucsb, 1, personalise="local-head"), privacy=privacy), tmp_path / "no")
    assert not (tmp_path / "no" / "flower.log").exists()


def assert_own_patient_table(out, sites):
    """What `compare --personalise` writes for every training site (run by test_simulation's
    compare test, which passes --personalise)."""
    table = json.loads((out / "metrics.json").read_text())["own_patients"]
    assert set(table["per_site"]) == set(sites)
    for site, row in table["per_site"].items():
        for kind in ("local", "global", "personalised"):
            assert row[kind]["n"] >= 1, (site, kind)  # the site's test patients
        with open(out / "own-patients" / site / "global" / "predictions.csv") as fh:
            assert {r["site"] for r in csv.DictReader(fh)} == {site}
        # MicroMIL's representatives stay distinct after fine-tuning (the body moved too).
        assert row["personalised"]["diversity"] >= row["global"]["diversity"] - 1e-9, (site, row)
        assert row["personalised"]["diversity"] > 0.9
    assert "own_patients" in json.loads((out / "federated" / "compare.json").read_text())
