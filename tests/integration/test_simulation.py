"""Federated MicroMIL in Flower's simulation engine on real data (UCSB breast TMA,
3 training hospitals + 1 held-out): outputs, a privacy audit of every message, and
resume-after-interruption equivalence."""

import json

import pytest
import torch

from micromil_core.cli import main
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.federated import wire
from micromil_core.training.checkpoint import file_sha256, load_checkpoint
from micromil_core.training.metrics import METRIC_KEYS
from server.simulation import simulate
from server.wire_log import WIRE_LOG, audit_replies, describe, read_wire_log
from tests.conftest import patient_ids, superlink_pids
from tests.integration.conftest import RecordingGrid, _cfg
from tests.integration.test_personalisation import TRAIN_SITES, assert_own_patient_table

pytestmark = pytest.mark.slow


def test_outputs(full_run):
    out, metrics, _ = full_run
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.provenance["round"] == 2 and ckpt.provenance["federated"]
    assert ckpt.scaler is not None and ckpt.classes == ["negative", "positive"]
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert history["run"]["train_sites"] == ["site-0", "site-1", "site-2"]
    first = history["rounds"][0]
    assert set(first["train"]) == {"site-0", "site-1", "site-2"} and set(first["holdout"]) == {"site-3"}
    assert first["bytes_sent"] > 0 and first["bytes_received"] > 0 and first["failures"] == []
    assert set(METRIC_KEYS) <= set(metrics) and metrics["round"] == 2
    assert metrics["model_sha256"] == file_sha256(out / "model.pt")
    site3 = metrics["per_site"]["site-3"]
    assert site3["auc_ci_low"] <= site3["auc"] <= site3["auc_ci_high"]
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "flower.log").is_file()
    # Counts are integers everywhere a person reads them; every file is strict JSON.
    assert isinstance(site3["num-examples"], int) and isinstance(metrics["n"], int)
    assert all(isinstance(m["num-examples"], int) for r in history["rounds"] for m in r["train"].values())
    for name in ("history.json", "metrics.json"):
        assert "NaN" not in (out / name).read_text()
    assert history["run"]["started"]  # the report's "started" row has a value


def test_no_patient_data_leaves_a_site(full_run, demo_ucsb):
    # Every reply, as the coordinator's Grid saw it in process and as its wire log on disk
    # (OUT/wire-log.jsonl) records it, holds only what the protocol allows.
    out, _, log = full_run
    ids = patient_ids(demo_ucsb)
    state_keys = set(load_checkpoint(out / "model.pt").state_dict)
    seen = [describe(r, "received") for _, replies in log for r in replies]
    # one query + 2 rounds x (3 train + 4 evaluate) replies
    assert audit_replies(seen, ids, state_keys) == 4 + 2 * (3 + 4)
    logged = read_wire_log(out / WIRE_LOG)
    assert [e for e in logged if e["direction"] == "received"] == json.loads(json.dumps(seen, default=str))
    for name in ("history.json", "metrics.json", "flower.log", "report.html", WIRE_LOG):
        text = (out / name).read_text()
        assert not any(pid in text for pid in ids), name


def test_resume_gives_the_same_model(full_run, demo_ucsb, tmp_path):
    out, _, _ = full_run
    part = tmp_path / "interrupted"
    simulate(_cfg(demo_ucsb, 1), part)  # "interrupted" after round 1
    with pytest.raises(ConfigError, match="--resume"):
        simulate(_cfg(demo_ucsb, 2), part)
    simulate(_cfg(demo_ucsb, 2), part, resume=True)
    a, b = load_checkpoint(out / "model.pt"), load_checkpoint(part / "model.pt")
    for key in a.state_dict:
        assert torch.allclose(a.state_dict[key], b.state_dict[key], atol=1e-6), key
    rounds = [r["round"] for r in json.loads((part / "history.json").read_text())["rounds"]]
    assert rounds == [1, 2]  # no round lost or repeated


def test_bad_federations_fail_before_round_one(demo_ucsb, tmp_path):
    import shutil

    with pytest.raises(ConfigError, match="krum needs at least 5 training sites"):
        simulate(_cfg(demo_ucsb, 1, strategy="krum", strategy_params={"num_malicious_nodes": 1}), tmp_path / "k")
    root = tmp_path / "mixed"
    shutil.copytree(demo_ucsb, root)
    for f in (root / "site-1" / "features").glob("*.pt"):
        torch.save(torch.randn(3, 5), f)
    with pytest.raises(SiteDataError, match="different feature dimensions.*site-1 has 5"):
        simulate(_cfg(root, 1), tmp_path / "d")
    assert not (tmp_path / "d" / "flower.log").exists()  # failed before the engine started


class LosingGrid(RecordingGrid):
    """Loses every training reply of round 2, as if all sites timed out."""

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app.message_type import MessageType

        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.log.append(len(self.log) + 1)
            if len(self.log) == 2:
                return []
        return replies


def test_a_round_without_replies_keeps_the_global_model(demo_ucsb, tmp_path):
    out = tmp_path / "lossy"
    simulate(_cfg(demo_ucsb, 2), out, grid_tap=lambda g: LosingGrid(g, []))
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    failures = " ".join(rounds[1]["failures"])
    for site in ("site-0", "site-1", "site-2"):
        assert f"{site}: no training reply" in failures  # named by site, not by node id
    assert "global model kept" in failures
    # The same global model was evaluated after round 1 and after the failed round 2.
    assert rounds[1]["holdout"] == rounds[0]["holdout"]
    assert rounds[1]["train"] == {}


def test_local_dp_sites_spend_their_budget_then_stop(demo_ucsb, tmp_path):
    from dataclasses import replace

    from micromil_core.config import PrivacyConfig
    from micromil_core.privacy.report import privacy_report
    from micromil_core.training.score import evaluate_checkpoint

    privacy = PrivacyConfig(mode="dp-sgd", target_epsilon=3.0, delta=1e-3)
    out, log = tmp_path / "dp", []
    simulate(replace(_cfg(demo_ucsb, 2), privacy=privacy), out, grid_tap=lambda g: RecordingGrid(g, log))
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    for site in ("site-0", "site-1", "site-2"):
        eps = [r["train"][site]["epsilon"] for r in rounds]
        assert 0 < eps[0] < eps[1] <= 3.0  # the 2 planned rounds spend the budget
        assert (out / "site-state" / site / "privacy-ledger.json").is_file()
    assert rounds[-1]["stopped_for_privacy"] == ["site-0", "site-1", "site-2"]
    # DP sites keep their feature statistics: no moments, per-site standardisation.
    query_replies = log[0][1]
    assert all(wire.MOMENTS not in r.content.array_records for r in query_replies)
    for _, replies in log:
        for r in replies:
            if wire.METRICS in r.content.metric_records:
                allowed = wire.ALLOWED_TRAIN_METRICS | wire.ALLOWED_EVAL_METRICS | wire.ALLOWED_SITE_METRICS
                assert set(r.content.metric_records[wire.METRICS]) <= allowed
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.scaler is None and ckpt.provenance["scaler"] == "site"
    held_out = evaluate_checkpoint(out / "model.pt", [demo_ucsb / "site-3"], tmp_path / "eval")
    assert held_out["auc"] == pytest.approx(rounds[-1]["holdout_aggregated"]["auc"])
    # Extending the run: every site is out of budget, so no further round trains.
    simulate(replace(_cfg(demo_ucsb, 4), privacy=privacy), out, resume=True)
    assert [r["round"] for r in json.loads((out / "history.json").read_text())["rounds"]] == [1, 2]
    assert set(privacy_report(out)["stops"]) == {"site-0", "site-1", "site-2"}


def test_compare_judges_every_setup_on_the_held_out_hospital(demo_ucsb, tmp_path, capsys):
    """`micromil compare` (the demo's command): local-only, pooled and federated models on
    the same held-out patients, with bootstrap intervals and the paired difference; with
    --personalise (here on Flower's supported path) also every training site's local,
    global and personal model on its own test patients (tests/integration/test_personalisation.py)."""
    out = tmp_path / "cmp"
    assert main(["compare", "--data-root", str(demo_ucsb), "--model", "micromil", "--rounds", "2",
                 "--local-epochs", "1", "--set", "model.params.n_clusters=8", "--personalise", "proximal",
                 "--set", "federation.personal_epochs=2",
                 "--set", "train.num_threads=1", "--out", str(out)]) == 0
    assert_own_patient_table(out, TRAIN_SITES)
    table = json.loads((out / "metrics.json").read_text())
    assert set(table["local"]) == {"site-0", "site-1", "site-2"}
    n_holdout = len((demo_ucsb / "site-3" / "patients.csv").read_text().split()) - 1
    for row in (table["pooled"], table["federated"], *table["local"].values()):
        assert row["n"] == n_holdout
        low, high = row["ci95"]["auc"]
        assert low <= row["auc"] <= high
    paired = table["federated_minus_pooled"]
    for key in METRIC_KEYS:
        d = paired[key]
        assert d["difference"] == pytest.approx(table["federated"][key] - table["pooled"][key])
        assert d["low"] <= d["high"]
    printed = capsys.readouterr().out
    assert "auc_ci95" in printed and "federated minus pooled" in printed
    report = (out / "federated" / "report.html").read_text()
    assert "federated minus pooled" in report
    assert "own test patients" in report and "own test patients" in printed  # the personal section


def test_float16_transport_halves_the_upload(demo_ucsb, tmp_path):
    """federation.transport=float16: same round, about half the bytes the sites send."""
    received, models = {}, {}
    for transport in ("float32", "float16"):
        out = tmp_path / transport
        simulate(_cfg(demo_ucsb, 1, transport=transport), out)
        first = json.loads((out / "history.json").read_text())["rounds"][0]
        assert first["failures"] == [] and len(first["train"]) == 3  # every float16 reply accepted
        received[transport] = first["bytes_received"]
        models[transport] = load_checkpoint(out / "model.pt").state_dict
    # The training replies dominate what comes back (evaluation replies are a few numbers).
    assert 0.45 < received["float16"] / received["float32"] < 0.6
    # The aggregate differs from full precision by float16 rounding only.
    for name, w in models["float32"].items():
        if w.is_floating_point():
            assert torch.allclose(models["float16"][name], w, rtol=2e-3, atol=1e-4), name


def test_flowers_supported_path_gives_the_same_model(full_run, demo_ucsb, tmp_path):
    # simulation.engine: superlink runs the same apps through `flwr run` on a private
    # SuperLink in simulation mode (Flower's supported path) instead of run_simulation.
    out, metrics, _ = full_run
    other = tmp_path / "superlink"
    got = simulate(_cfg(demo_ucsb, 2, engine="superlink"), other)
    a, b = load_checkpoint(out / "model.pt").state_dict, load_checkpoint(other / "model.pt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert got["auc"] == metrics["auc"] and got["per_site"].keys() == metrics["per_site"].keys()
    assert (other / "report.html").is_file()
    # Flower's engine took the coordinator's messages when pushed, not on its 0.1 s timer.
    assert "messages handed over when pushed" in (other / "server.log").read_text()
    # Stopped with the run: the SuperLink and every process it started (Flower's Ray too).
    assert not superlink_pids(other / ".flower" / "home", program=b"")
    # The messages of this path, from the coordinator's wire log: the same audit as in process.
    state_keys = set(load_checkpoint(other / "model.pt").state_dict)
    assert audit_replies(read_wire_log(other / WIRE_LOG), patient_ids(demo_ucsb), state_keys) == 4 + 2 * (3 + 4)
    with pytest.raises(ConfigError, match="grid_tap needs simulation.engine: in-process"):
        simulate(_cfg(demo_ucsb, 1, engine="superlink"), tmp_path / "tap", grid_tap=lambda g: g)
