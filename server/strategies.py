"""Flower strategies by config name, with the checks a federation needs before round 1."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from micromil_core.config import FederationConfig, PrivacyConfig
from micromil_core.errors import ConfigError
from micromil_core.federated import wire
from micromil_core.io import write_bytes_atomic
from server.privacy import check_privacy_fits, wrap_central_dp

STRATEGY_CLASSES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
# Defaults that differ from Flower's: FedProx needs a mu; the adaptive optimisers' server
# learning rate 0.1 is far too large for attention/GNN weights.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedprox": {"proximal_mu": 0.01},
    "fedadam": {"eta": 1e-3, "eta_l": 1e-3, "tau": 1e-8},
    "fedyogi": {"eta": 1e-3, "eta_l": 1e-3, "tau": 1e-8},
    "fedadagrad": {"eta": 1e-2, "eta_l": 1e-2, "tau": 1e-8},
}
# Attributes that carry a strategy's memory between rounds (saved for --resume);
# clipping_norm: an adaptive-clipping DP wrapper's current norm.
STATEFUL_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector", "clipping_norm")
WRAPPED = "strategy."  # state-file prefix of the strategy inside a DP wrapper


def min_sites_for(name: str, params: dict[str, Any]) -> int:
    """The fewest training sites a strategy can aggregate meaningfully."""
    if name == "krum":
        # Krum scores each update by its n - f - 2 nearest neighbours: needs n > 2f + 2.
        return 2 * int(params.get("num_malicious_nodes", 0)) + 3
    if name == "fedtrimmedavg":
        return 3  # trimming a fraction from both ends of fewer than 3 leaves nothing
    if name == "fedmedian":
        return 2
    return 1


def build_strategy(cfg: FederationConfig, n_train_sites: int, privacy: PrivacyConfig | None = None):
    """The configured Flower strategy, sampling every training site each round, inside
    Flower's central-DP wrapper when ``privacy.central`` asks for one."""
    params = {**STRATEGY_DEFAULTS.get(cfg.strategy, {}), **dict(cfg.strategy_params)}
    needed = min_sites_for(cfg.strategy, params)
    if n_train_sites < needed:
        raise ConfigError(
            f"federation.strategy={cfg.strategy} needs at least {needed} training sites, "
            f"but {n_train_sites} are configured; add sites or choose fedavg"
        )
    min_sites = cfg.min_train_sites or n_train_sites
    if min_sites > n_train_sites:
        raise ConfigError(
            f"federation.min_train_sites={cfg.min_train_sites} exceeds the {n_train_sites} "
            "training sites; lower it or add sites"
        )
    # Evaluation messages are sent by the round loop itself (to training AND held-out
    # sites), so the strategy's configure_evaluate is never called.
    common = dict(
        fraction_train=1.0,
        min_train_nodes=min_sites,
        min_available_nodes=min_sites,
        weighted_by_key=wire.NUM_EXAMPLES,
    )
    privacy = privacy or PrivacyConfig()
    check_privacy_fits(cfg, privacy, n_train_sites)
    try:
        strategy = STRATEGY_CLASSES[cfg.strategy](**common, **params)
    except TypeError as exc:
        raise ConfigError(
            f"federation.strategy_params {params} do not fit {cfg.strategy}: {exc}"
        ) from None
    return wrap_central_dp(strategy, privacy.central, n_train_sites)


def _plain(value: Any) -> Any:
    """ArrayRecords become dicts of numpy arrays so the state pickles without flwr objects."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: v.numpy() for k, v in value.items()}}
    return value


def _restore(value: Any) -> Any:
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in value["__arrayrecord__"].items()})
    return value


def _layers(strategy) -> list[tuple[str, object]]:
    """The strategy and, inside a DP wrapper, the strategy it wraps (with its prefix)."""
    inner = getattr(strategy, "strategy", None)
    return [("", strategy)] + ([(WRAPPED, inner)] if inner is not None else [])


def save_strategy_state(strategy, path: Path) -> None:
    state = {
        prefix + a: _plain(getattr(s, a))
        for prefix, s in _layers(strategy)
        for a in STATEFUL_ATTRIBUTES
        if hasattr(s, a)
    }
    write_bytes_atomic(path, pickle.dumps(state))


def load_strategy_state(strategy, path: Path) -> None:
    if not path.is_file():
        return
    # Our own file, written by this coordinator in this run folder.
    state = pickle.loads(path.read_bytes())
    layers = dict(_layers(strategy))
    for name, value in state.items():
        prefix = WRAPPED if name.startswith(WRAPPED) and WRAPPED in layers else ""
        setattr(layers[prefix], name.removeprefix(prefix), _restore(value))
