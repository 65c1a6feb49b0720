"""Flower strategies by config name, with the checks a federation needs before round 1."""

from __future__ import annotations

import io
import json
import zipfile
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
from micromil_core.errors import CheckpointError, ConfigError
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
MANIFEST = "manifest.json"  # the state file's entry that describes the others


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


def _layers(strategy) -> list[tuple[str, object]]:
    """The strategy and, inside a DP wrapper, the strategy it wraps (with its prefix)."""
    inner = getattr(strategy, "strategy", None)
    return [("", strategy)] + ([(WRAPPED, inner)] if inner is not None else [])


def save_strategy_state(strategy, path: Path) -> None:
    """The strategy's memory as arrays plus a JSON manifest in one ``.npz`` (no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    manifest: dict[str, Any] = {}
    for prefix, s in _layers(strategy):
        for attr in STATEFUL_ATTRIBUTES:
            if hasattr(s, attr):
                manifest[prefix + attr] = _pack(getattr(s, attr), arrays)
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def load_strategy_state(strategy, path: Path) -> None:
    """Restore what ``save_strategy_state`` wrote. Data only: numpy refuses object arrays
    (``allow_pickle=False``), so a tampered file can fail to load but never runs code."""
    if not path.is_file():
        return
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        manifest = json.loads(arrays.pop(MANIFEST).tobytes().decode())
        layers = dict(_layers(strategy))
        restored = []
        for name, entry in manifest.items():
            prefix = WRAPPED if name.startswith(WRAPPED) and WRAPPED in layers else ""
            attr = name.removeprefix(prefix)
            if attr not in STATEFUL_ATTRIBUTES:
                raise ValueError(f"unexpected attribute {name!r}")
            restored.append((layers[prefix], attr, _unpack(entry, arrays)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path} is damaged or was not written by this coordinator ({type(exc).__name__}: "
            f"{exc}); nothing in it was run. Restore it from a backup, or remove it to resume "
            "with the strategy's memory (server momentum/moments) reset"
        ) from None
    for layer, attr, value in restored:  # all or nothing: set only once every entry parsed
        setattr(layer, attr, value)


def _pack(value: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """One attribute as a JSON entry; its arrays go into ``arrays`` under fresh names."""

    def put(array: Any) -> str:
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(array)
        return name

    if value is None:
        return {"kind": "none"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"kind": "number", "value": float(value)}
    if isinstance(value, ArrayRecord):
        return {"kind": "arrayrecord", "arrays": {k: put(v.numpy()) for k, v in value.items()}}
    if isinstance(value, dict):
        return {"kind": "dict", "arrays": {str(k): put(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"kind": "list", "arrays": [put(v) for v in value]}
    raise TypeError(f"cannot save strategy state of type {type(value).__name__}")


def _unpack(entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    kind = entry["kind"]
    if kind == "none":
        return None
    if kind == "number":
        return float(entry["value"])
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(arrays[a]) for k, a in entry["arrays"].items()})
    if kind == "dict":
        return {k: arrays[a] for k, a in entry["arrays"].items()}
    if kind == "list":
        return [arrays[a] for a in entry["arrays"]]
    raise ValueError(f"unknown entry kind {kind!r}")
