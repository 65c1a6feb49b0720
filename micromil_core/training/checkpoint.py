"""Checkpoints that carry everything ``evaluate`` needs: model spec, weights, classes,
feature scaler, feature source (encoder) and provenance (config, metrics, code version)."""

from __future__ import annotations

import datetime as _dt
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

FORMAT = "micromil-checkpoint/1"


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
        raise CheckpointError(f"checkpoint {path} could not be read ({exc}); is it a micromil model.pt?") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a micromil checkpoint (format {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r})"
        )
    m = raw["model"]
    return Checkpoint(
        model_name=m["name"],
        in_dim=int(m["in_dim"]),
        n_classes=int(m["n_classes"]),
        params=dict(m["params"]),
        classes=list(raw["classes"]),
        state_dict=raw["state_dict"],
        scaler=FeatureScaler.from_state_dict(raw["scaler"]) if raw.get("scaler") else None,
        encoder=raw.get("encoder"),
        fine_classes=raw.get("fine_classes"),
        config=raw.get("config", {}),
        provenance=raw.get("provenance", {}),
    )
