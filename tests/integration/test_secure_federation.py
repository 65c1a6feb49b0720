"""SecAgg+ and central DP in Flower's simulation engine on the UCSB federation of
test_simulation (3 training hospitals + 1 held out): the same model as plain FedAvg up to
quantisation, no site's update reaching the server, and central DP's noise and epsilon.

Round 1 starts from the same seeded model with the same seeded local training in every
run, so the sites' round-1 updates are identical across runs and the round-1 global
models differ only by what secure aggregation or central DP does to the aggregate.
"""

import csv
import json

import numpy as np
import pytest
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from micromil_core.federated import wire
from server.simulation import simulate
from tests.integration.test_simulation import RecordingGrid, _cfg

pytestmark = pytest.mark.slow
TRAIN_SITES = ("site-0", "site-1", "site-2")
SECAGG_REPLY_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
                     Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}


def _run(root, out, rounds, privacy=None):
    from dataclasses import replace

    from micromil_core.config import build_config

    cfg = _cfg(root, rounds)
    if privacy:
        cfg = replace(cfg, privacy=build_config({"privacy": privacy}).privacy)
    log = []
    simulate(cfg, out, grid_tap=lambda g: RecordingGrid(g, log))
    return log, json.loads((out / "history.json").read_text())["rounds"]


def _of_type(log, kind):
    return [(m, r) for m, r in log if m and m[0].metadata.message_type == kind]


def _global_after_round(log, rnd):
    """The global model as the server sent it for evaluation after round ``rnd``."""
    messages, _ = _of_type(log, MessageType.EVALUATE)[rnd - 1]
    return {k: v.numpy() for k, v in messages[0].content.array_records[wire.ARRAYS].items()}


def _patients(root, site):
    with open(root / site / "patients.csv") as fh:
        return sum(1 for _ in csv.DictReader(fh))


@pytest.fixture(scope="module")
def plain(demo_ucsb, tmp_path_factory):
    log, rounds = _run(demo_ucsb, tmp_path_factory.mktemp("plain") / "run", 1)
    messages, replies = _of_type(log, MessageType.TRAIN)[0]
    start = {k: v.numpy() for k, v in messages[0].content.array_records[wire.ARRAYS].items()}
    site_of = {r.metadata.src_node_id: str(r.content.config_records[wire.SITE][wire.SITE_NAME]) for r in log[0][1]}
    local = {  # site -> its round-1 model, as plain FedAvg receives it
        site_of[r.metadata.src_node_id]: {k: v.numpy() for k, v in r.content.array_records[wire.ARRAYS].items()}
        for r in replies
    }
    assert sorted(local) == list(TRAIN_SITES)
    return {"log": log, "rounds": rounds, "start": start, "local": local, "global": _global_after_round(log, 1)}


@pytest.fixture(scope="module")
def secure(demo_ucsb, tmp_path_factory):
    log, rounds = _run(demo_ucsb, tmp_path_factory.mktemp("secagg") / "run", 1, {"secure_aggregation": True})
    return {"log": log, "rounds": rounds}


def test_secure_aggregation_gives_the_plain_model(plain, secure, demo_ucsb):
    from micromil_core.config import SecureAggregationConfig

    sa = SecureAggregationConfig()
    assert secure["rounds"][0]["failures"] == []
    got = _global_after_round(secure["log"], 1)
    # Each site sends round(w_i * x / step) with w_i = patients / max_weight (the training
    # sites' total patients) and step = 2 * clipping_range / quantization_range; the
    # server divides the sum by sum(w_i): error <= n * step / sum(w_i), twice for margin.
    trained = sum(m[wire.NUM_EXAMPLES] for m in secure["rounds"][0]["train"].values())
    sum_w = trained / sum(_patients(demo_ucsb, s) for s in TRAIN_SITES)
    step = 2 * sa.clipping_range / sa.quantization_range
    tol = 2 * len(TRAIN_SITES) * step / sum_w
    worst = max(float(np.abs(got[k] - plain["global"][k]).max()) for k in got)
    assert worst <= tol, (worst, tol)
    assert any(not np.array_equal(got[k], plain["global"][k]) for k in got)  # it did quantise
    # What the server still sees: each site's aggregate train metrics, as on the plain path.
    for site in TRAIN_SITES:
        a, b = secure["rounds"][0]["train"][site], plain["rounds"][0]["train"][site]
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_server_never_receives_a_site_update(plain, secure, demo_ucsb):
    exchanges = _of_type(secure["log"], MessageType.TRAIN)
    stages = [str(m[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) for m, _ in exchanges]
    assert stages == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    keys = list(plain["start"])
    max_weight = sum(_patients(demo_ucsb, s) for s in TRAIN_SITES)
    masked_seen = 0
    for _, replies in exchanges:
        for r in replies:
            assert not r.has_error()
            # no model arrays at all: secaggplus_mod empties the FitRes arrays
            assert all(len(rec) == 0 for rec in r.content.array_records.values())
            protocol = r.content.config_records[RECORD_KEY_CONFIGS]
            assert set(protocol) <= SECAGG_REPLY_KEYS
            if "fitres.metrics" in r.content.config_records:
                assert set(r.content.config_records["fitres.metrics"]) <= wire.ALLOWED_TRAIN_METRICS
            if Key.MASKED_PARAMETERS not in protocol:
                continue
            masked_seen += 1
            masked = [bytes_to_ndarray(b) for b in protocol[Key.MASKED_PARAMETERS]][1:]  # [0]: weight
            flat = np.concatenate([m.ravel() for m in masked]).astype(np.float64)
            for site, model in plain["local"].items():
                x = np.concatenate([model[k].ravel() for k in keys]).astype(np.float64)
                assert not np.allclose(flat, x, atol=1e-3), site  # not the plain model ...
                w = plain["rounds"][0]["train"][site][wire.NUM_EXAMPLES] / max_weight
                q = (np.clip(w * x, -8.0, 8.0) + 8.0) * (2**22 / 16.0)
                assert np.mean(np.abs(flat - q) <= 1.0) < 0.01, site  # ... nor its quantised form
    assert masked_seen == 3


def test_central_dp_adds_calibrated_noise_and_accounts_epsilon(plain, demo_ucsb, tmp_path):
    from opacus.accountants import RDPAccountant

    sigma, clip = 0.3, 3.0
    log, rounds = _run(demo_ucsb, tmp_path / "dp", 2, {
        "central": {"mode": "fixed-clipping", "clipping": "server", "clipping_norm": clip,
                    "noise_multiplier": sigma, "delta": 1e-5},
    })
    # No round-1 update reaches the norm, so clipping is a no-op and the difference from
    # the plain round-1 model is the noise alone: std sigma * C / n_sites per weight.
    norms = [
        np.sqrt(sum(((m[k] - plain["start"][k]) ** 2).sum() for k in m)) for m in plain["local"].values()
    ]
    assert max(norms) < clip, norms
    got = _global_after_round(log, 1)
    diff = np.concatenate([(got[k] - plain["global"][k]).ravel() for k in got])
    assert diff.std() == pytest.approx(sigma * clip / 3, rel=0.05)

    entries = [r["central_dp"] for r in rounds]
    eps = [e["epsilon"] for e in entries]
    assert 0 < eps[0] < eps[1] < float("inf")
    assert all(e["clipping_norm"] == clip and e["mode"] == "fixed-clipping" for e in entries)
    # Independent check: Opacus RDP, one full-participation Gaussian step per round, at
    # the largest site's multiplier sigma * sum(w) / (n * max(w)) (patient weights).
    accountant = RDPAccountant()
    for r, e in zip(rounds, eps, strict=True):
        w = [m[wire.NUM_EXAMPLES] for m in r["train"].values()]
        accountant.step(noise_multiplier=sigma * sum(w) / (3 * max(w)), sample_rate=1.0)
        assert e == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
