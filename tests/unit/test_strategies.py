"""Strategy choice by name, the site-count checks, and strategy state for --resume."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from micromil_core.config import STRATEGIES, FederationConfig
from micromil_core.errors import ConfigError
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
    save_strategy_state(s, tmp_path / "state.pkl")
    fresh = build_strategy(FederationConfig(strategy="fedadam"), 2)
    load_strategy_state(fresh, tmp_path / "state.pkl")
    assert np.array_equal(fresh.m_t["w"], np.ones(3)) and np.array_equal(fresh.v_t["w"], np.full(3, 2.0))


def test_momentum_state_with_array_record_round_trips(tmp_path):
    s = build_strategy(FederationConfig(strategy="fedavgm", strategy_params={"server_momentum": 0.9}), 2)
    s.current_arrays = ArrayRecord({"w": Array(np.arange(3.0))})
    s.momentum_vector = [np.ones(3)]
    save_strategy_state(s, tmp_path / "state.pkl")
    fresh = build_strategy(FederationConfig(strategy="fedavgm"), 2)
    load_strategy_state(fresh, tmp_path / "state.pkl")
    assert np.array_equal(fresh.current_arrays["w"].numpy(), np.arange(3.0))
    assert np.array_equal(fresh.momentum_vector[0], np.ones(3))
