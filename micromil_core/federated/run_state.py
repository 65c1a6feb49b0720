"""What survives a coordinator restart: the round, the global and best weights and the
history, saved after every round and checked against the run's settings on resume.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from micromil_core.config import ExperimentConfig
from micromil_core.errors import CheckpointError
from micromil_core.federated.history import RoundRecord, utc_now
from micromil_core.federated.site_task import ModelSpec
from micromil_core.io import torch_save_atomic

STATE_FILE = "federation-state.pt"


@dataclass
class RunState:
    """What survives a coordinator restart (saved after every round)."""

    round: int
    arrays: dict[str, torch.Tensor]
    history: list[RoundRecord]
    best_round: int
    best_arrays: dict[str, torch.Tensor]
    best_val_loss: float
    # Drawn once per run and kept across restarts: sites account DP-SGD per federation id.
    federation_id: str = field(default_factory=lambda: secrets.token_hex(8))
    started: str = field(default_factory=utc_now)  # when round 1 began, kept across restarts

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        torch_save_atomic(
            {
                "round": self.round,
                "arrays": self.arrays,
                "history": [r.to_dict() for r in self.history],
                "best_round": self.best_round,
                "best_arrays": self.best_arrays,
                "best_val_loss": self.best_val_loss,
                "federation_id": self.federation_id,
                "started": self.started,
                **extra,
            },
            path,
        )


def load_run_state(path: Path, cfg: ExperimentConfig, spec: ModelSpec) -> RunState | None:
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); remove it to start afresh") from None
    saved = raw.get("experiment", {})
    now = cfg.to_dict()
    for section in ("model", "data", "federation", "privacy"):
        a, b = dict(saved.get(section, {})), dict(now.get(section, {}))
        a.pop("rounds", None)
        b.pop("rounds", None)
        if a != b:
            raise CheckpointError(
                f"cannot resume {path}: its {section} settings differ from this run's "
                f"({a} vs {b}); resume with the original config or use a new --out"
            )
    if raw.get("spec") != [spec.name, spec.in_dim, spec.n_classes]:
        raise CheckpointError(f"cannot resume {path}: it holds a different model/site setup")
    history = [RoundRecord.from_dict(r, i) for i, r in enumerate(raw["history"], start=1)]
    state = RunState(
        int(raw["round"]), raw["arrays"], history, int(raw["best_round"]),
        raw["best_arrays"], float(raw["best_val_loss"]),
    )
    if raw.get("federation_id"):
        state.federation_id = str(raw["federation_id"])
    if raw.get("started"):
        state.started = str(raw["started"])
    return state

