"""Checkpoints that carry everything ``evaluate`` needs: model spec, weights, classes,
feature scaler, feature source (encoder) and provenance (config, metrics, code version)."""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from micromil_core import __version__
from micromil_core.data.scaler import FeatureScaler
from micromil_core.errors import CheckpointError
from micromil_core.io import torch_save_atomic
from micromil_core.models.base import MILModel
from micromil_core.models.registry import build_model

# /2: MicroMIL's `selection` option exists (issue 19); a /1 file was trained without it.
FORMAT = "micromil-checkpoint/2"
READABLE_FORMATS = ("micromil-checkpoint/1", FORMAT)


def upgrade_params(model_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Model parameters of a format /1 checkpoint, with the values it was trained under.

    MicroMIL's ``selection`` option came with format /2; a /1 checkpoint was trained with
    the authors' draw, so it loads as ``"released"``, not as today's default. MHIM around
    MicroMIL carries the same in ``base_params``.
    """
    out = dict(params)
    if model_name == "micromil" and "selection" not in out:
        out["selection"] = "released"
    if model_name == "mhim" and out.get("base") == "micromil":
        out["base_params"] = upgrade_params("micromil", dict(out.get("base_params") or {}))
    return out


@dataclass
class Checkpoint:
    model_name: str
    in_dim: int
    n_classes: int
    params: dict[str, Any]
    classes: list[str]
    state_dict: dict[str, torch.Tensor]
    scaler: FeatureScaler | None = None
    encoder: str | None = None
    fine_classes: list[str] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    # A hospital's recalibration of the probabilities (training/recalibration.py), or None.
    calibration: dict[str, Any] | None = None

    def build_model(self) -> MILModel:
        model = build_model(self.model_name, self.in_dim, self.n_classes, self.params)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint weights do not fit model {self.model_name!r}: {exc}"
            ) from None
        model.eval()
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": {
                "name": self.model_name,
                "in_dim": self.in_dim,
                "n_classes": self.n_classes,
                "params": dict(self.params),
            },
            "classes": list(self.classes),
            "fine_classes": self.fine_classes,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "encoder": self.encoder,
            "calibration": self.calibration,
            "config": self.config,
            "provenance": {
                "code_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **self.provenance,
            },
        }


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    return torch_save_atomic(ckpt.to_dict(), path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the model.pt a training run wrote")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        # Not PyTorch's own advice (load with weights_only=False): that would run any code
        # a tampered file carries. A model.pt is data only.
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(exc).__name__}): it is not a micromil "
            f"model.pt, is damaged, or holds code rather than data, which micromil never "
            f"loads; pass the model.pt a training run wrote"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} is not a micromil checkpoint (format {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r})"
        )
    m = raw["model"]
    params = dict(m["params"])
    if raw["format"] != FORMAT:
        params = upgrade_params(m["name"], params)
    return Checkpoint(
        model_name=m["name"],
        in_dim=int(m["in_dim"]),
        n_classes=int(m["n_classes"]),
        params=params,
        classes=list(raw["classes"]),
        state_dict=raw["state_dict"],
        scaler=FeatureScaler.from_state_dict(raw["scaler"]) if raw.get("scaler") else None,
        encoder=raw.get("encoder"),
        fine_classes=raw.get("fine_classes"),
        config=raw.get("config", {}),
        provenance=raw.get("provenance", {}),
        calibration=raw.get("calibration"),
    )


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file: how a hospital checks the model.pt it received is the one the
    coordinator wrote (the coordinator logs it at the end of a run)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What a model.pt is, for a person deciding whether to use it (``micromil inspect``).

    Loads the file the safe way (weights only, never code) and summarises the model, its
    inputs, how it was trained and the privacy settings it records. No weights are shown.
    """
    ckpt = load_checkpoint(path)
    prov = dict(ckpt.provenance)
    privacy = ckpt.config.get("privacy") or {}
    central = privacy.get("central") or {}
    training: dict[str, Any] = {
        "federated": bool(prov.get("federated")),
        "trained_on": prov.get("trained_on"),
    }
    if training["federated"]:
        training.update(round=prov.get("round"), strategy=prov.get("strategy"))
    else:
        training.update(best_epoch=prov.get("best_epoch"), validation=prov.get("validation"))
    return {
        "file": str(path),
        "sha256": file_sha256(path),
        "bytes": Path(path).stat().st_size,
        "code_version": prov.get("code_version"),
        "created": prov.get("created"),
        "model": ckpt.model_name,
        "parameters": int(sum(t.numel() for t in ckpt.state_dict.values())),
        "params": dict(ckpt.params),
        "classes": list(ckpt.classes),
        "fine_classes": ckpt.fine_classes,
        "input": {
            "encoder": ckpt.encoder,
            "feature_dim": ckpt.in_dim,
            "scaler": prov.get("scaler", "global" if ckpt.scaler is not None else "none"),
        },
        "training": training,
        "calibration": ckpt.calibration,
        "calibrated_on": prov.get("calibrated_on"),
        "privacy_in_config": {
            "local": privacy.get("mode", "none"),
            "target_epsilon": privacy.get("target_epsilon"),
            "central": central.get("mode", "none"),
            "secure_aggregation": bool(privacy.get("secure_aggregation")),
        },
    }


def format_description(info: dict[str, Any]) -> str:
    """``describe_checkpoint`` as a few readable lines."""
    inp, tr, dp = info["input"], info["training"], info["privacy_in_config"]
    source = f"images encoded with {inp['encoder']}" if inp["encoder"] else "precomputed features"
    lines = [
        f"{info['file']}: {info['model']} ({info['parameters']:,} parameters)",
        f"  sha256  {info['sha256']}  ({info['bytes']:,} bytes)",
        f"  classes {', '.join(info['classes'])}"
        + (f"; fine classes {', '.join(info['fine_classes'])}" if info["fine_classes"] else ""),
        f"  input   {source}, dimension {inp['feature_dim']}, standardised: {inp['scaler']}",
    ]
    sites = ", ".join(tr["trained_on"] or []) or "unknown"
    if tr["federated"]:
        lines.append(f"  trained federated ({tr['strategy']}, round {tr['round']}) on {sites}")
    else:
        lines.append(f"  trained on {sites}, best epoch {tr['best_epoch']}")
    local = dp["local"]
    if local != "none" and dp["target_epsilon"]:
        local += f", epsilon budget {dp['target_epsilon']}"
    cal = info["calibration"]
    if cal:
        where = info["calibrated_on"] or {}
        lines.append(
            f"  recalibrated ({cal['method']} {', '.join(f'{v:.3g}' for v in cal['params'])}) "
            f"on {where.get('n', '?')} patients of {', '.join(where.get('sites', [])) or '?'}"
        )
    lines.append(
        f"  privacy (experiment config) local {local}; central {dp['central']}; "
        f"secure aggregation {'on' if dp['secure_aggregation'] else 'off'}"
    )
    lines.append(f"  written {info['created']} by micromil-fl {info['code_version']}")
    return "\n".join(lines)
