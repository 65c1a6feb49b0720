"""Strategy choice by name, the site-count checks, and strategy state for --resume."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from micromil_core.config import STRATEGIES, FederationConfig
from micromil_core.errors import CheckpointError, ConfigError
from micromil_core.federated import wire
from server.strategies import build_strategy, load_strategy_state, save_strategy_state


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_configured_strategy_builds(name):
    strategy = build_strategy(FederationConfig(strategy=name), n_train_sites=5)
    assert strategy.weighted_by_key == wire.NUM_EXAMPLES
    assert strategy.min_train_nodes == 5  # min_train_sites=0 means every training site


def test_fedprox_sends_a_proximal_mu():
    assert build_strategy(FederationConfig(strategy="fedprox"), 3).proximal_mu == pytest.approx(0.01)
    s = build_strategy(FederationConfig(strategy="fedprox", strategy_params={"proximal_mu": 0.1}), 3)
    assert s.proximal_mu == pytest.approx(0.1)


@pytest.mark.parametrize(
    "cfg, sites, match",
    [
        (FederationConfig(strategy="krum", strategy_params={"num_malicious_nodes": 1}), 4, "at least 5"),
        (FederationConfig(strategy="fedtrimmedavg"), 2, "at least 3"),
        (FederationConfig(min_train_sites=4), 3, "exceeds the 3"),
        (FederationConfig(strategy_params={"not_a_knob": 1}), 3, "do not fit fedavg"),
    ],
)
def test_strategy_checks_name_the_problem(cfg, sites, match):
    with pytest.raises(ConfigError, match=match):
        build_strategy(cfg, sites)


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="federation.strategy='fedsgd'.*fedavg"):
        FederationConfig(strategy="fedsgd")


def test_adaptive_strategy_state_round_trips(tmp_path):
    s = build_strategy(FederationConfig(strategy="fedadam"), 2)
    s.m_t = {"w": np.ones(3)}
    s.v_t = {"w": np.full(3, 2.0)}
    s.current_arrays = {"w": np.zeros(3)}
    save_strategy_state(s, tmp_path / "state.npz")
    fresh = build_strategy(FederationConfig(strategy="fedadam"), 2)
    load_strategy_state(fresh, tmp_path / "state.npz")
    assert np.array_equal(fresh.m_t["w"], np.ones(3)) and np.array_equal(fresh.v_t["w"], np.full(3, 2.0))


def test_momentum_state_with_array_record_round_trips(tmp_path):
    s = build_strategy(FederationConfig(strategy="fedavgm", strategy_params={"server_momentum": 0.9}), 2)
    s.current_arrays = ArrayRecord({"w": Array(np.arange(3.0))})
    s.momentum_vector = [np.ones(3)]
    save_strategy_state(s, tmp_path / "state.npz")
    fresh = build_strategy(FederationConfig(strategy="fedavgm"), 2)
    load_strategy_state(fresh, tmp_path / "state.npz")
    assert np.array_equal(fresh.current_arrays["w"].numpy(), np.arange(3.0))
    assert np.array_equal(fresh.momentum_vector[0], np.ones(3))


class _Payload:
    """Unpickling this would create a file: the proof that a loader ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _fedadam_state(tmp_path):
    s = build_strategy(FederationConfig(strategy="fedadam"), 2)
    s.m_t, s.v_t, s.current_arrays = {"w": np.ones(3)}, {"w": np.full(3, 2.0)}, {"w": np.zeros(3)}
    path = tmp_path / "strategy-state.npz"
    save_strategy_state(s, path)
    return path


def test_strategy_state_file_holds_no_pickle(tmp_path):
    path = _fedadam_state(tmp_path)
    with np.load(path, allow_pickle=False) as npz:  # would raise on any object array
        assert all(npz[k].dtype != object for k in npz.files)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled-object", "unknown-attribute"])
def test_tampered_strategy_state_is_refused_and_runs_nothing(tmp_path, damage):
    path = _fedadam_state(tmp_path)
    marker = tmp_path / "code-ran"
    if damage == "garbage":
        path.write_bytes(b"not a state file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "pickled-object":
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["a0"] = np.array([_Payload(str(marker))], dtype=object)
        np.savez(path, **arrays)
    else:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        manifest = json.loads(arrays["manifest.json"].tobytes())
        manifest["__class__"] = {"kind": "number", "value": 1.0}
        arrays["manifest.json"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    fresh = build_strategy(FederationConfig(strategy="fedadam"), 2)
    with pytest.raises(CheckpointError, match="strategy-state.npz is damaged.*nothing in it was run"):
        load_strategy_state(fresh, path)
    assert not marker.exists()
    assert fresh.m_t is None  # nothing half-restored
