"""The history of a federated run: one typed record per round, written to and read from
``RUN/history.json`` through this module only.

The coordinator appends a ``RoundRecord`` after every round and rewrites the file (strict
JSON: NaN and infinities become ``null``); the HTML report, ``micromil privacy-report`` and
the CLI read it back with ``read_history``. Metric maps stay plain dicts (metric name ->
value) because each model and privacy setting adds its own keys; everything around them has a
fixed type. Files written before a field existed read with that field's default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from micromil_core.errors import MicroMILError
from micromil_core.io import write_json_atomic

HISTORY_FILE = "history.json"

Metrics = dict[str, Any]


class HistoryError(MicroMILError, ValueError):
    """history.json is missing, not JSON, or not a federation history."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC to the second, as history.json records it."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _dict(value: Any) -> dict[str, Any]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _site_metrics(value: Any) -> dict[str, Metrics]:
    """{site: metrics}, dropping entries that are not metric maps."""
    return {site: dict(m) for site, m in _dict(value).items() if isinstance(m, dict)}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


@dataclass
class RunInfo:
    """What the run was asked to do, and when it started."""

    model: str | None = None
    strategy: str | None = None
    rounds: int | None = None  # planned
    local_epochs: int | None = None
    seed: int | None = None
    train_sites: list[str] = field(default_factory=list)
    holdout_sites: list[str] = field(default_factory=list)
    started: str | None = None  # ISO 8601 UTC; kept across a resume

    @classmethod
    def from_dict(cls, raw: Any) -> RunInfo:
        raw = _dict(raw)

        def whole(key: str) -> int | None:
            v = _number(raw.get(key))
            return int(v) if v is not None else None

        def text(key: str) -> str | None:
            return None if raw.get(key) is None else str(raw[key])

        return cls(
            model=text("model"), strategy=text("strategy"), rounds=whole("rounds"),
            local_epochs=whole("local_epochs"), seed=whole("seed"),
            train_sites=_strings(raw.get("train_sites")),
            holdout_sites=_strings(raw.get("holdout_sites")), started=text("started"),
        )


@dataclass
class RoundRecord:
    """One round as the coordinator saw it: each site's reply metrics (already under the
    small-count guard) and their patient-weighted aggregates, traffic, failures."""

    round: int
    wall_seconds: float | None = None  # this round's training + evaluation, start to end
    bytes_sent: int | None = None
    bytes_received: int | None = None
    train: dict[str, Metrics] = field(default_factory=dict)
    train_aggregated: Metrics = field(default_factory=dict)
    evaluate: dict[str, Metrics] = field(default_factory=dict)  # training sites' validation
    evaluate_aggregated: Metrics = field(default_factory=dict)
    holdout: dict[str, Metrics] = field(default_factory=dict)
    holdout_aggregated: Metrics = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # Replies refused before use: {"train" | "evaluate": {site: why}}.
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)
    stopped_for_privacy: list[str] = field(default_factory=list)
    central_dp: Metrics | None = None  # only in runs with central DP

    @property
    def validation_loss(self) -> float:
        """The training sites' aggregated validation loss (NaN when not known)."""
        v = _number(self.evaluate_aggregated.get("loss"))
        return math.nan if v is None else v

    def to_dict(self) -> dict[str, Any]:
        out = {
            "round": self.round, "wall_seconds": self.wall_seconds,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "train": self.train, "train_aggregated": self.train_aggregated,
            "evaluate": self.evaluate, "evaluate_aggregated": self.evaluate_aggregated,
            "holdout": self.holdout, "holdout_aggregated": self.holdout_aggregated,
            "failures": self.failures, "rejected": self.rejected,
            "stopped_for_privacy": self.stopped_for_privacy,
        }
        if self.central_dp is not None:
            out["central_dp"] = self.central_dp
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], position: int) -> RoundRecord:
        """A record from its JSON form; ``position`` (1-based) numbers a round without one."""
        number = _number(raw.get("round"))

        def whole(key: str) -> int | None:
            v = _number(raw.get(key))
            return int(v) if v is not None else None

        return cls(
            round=int(number) if number is not None else position,
            wall_seconds=_number(raw.get("wall_seconds")),
            bytes_sent=whole("bytes_sent"), bytes_received=whole("bytes_received"),
            train=_site_metrics(raw.get("train")), train_aggregated=_dict(raw.get("train_aggregated")),
            evaluate=_site_metrics(raw.get("evaluate")),
            evaluate_aggregated=_dict(raw.get("evaluate_aggregated")),
            holdout=_site_metrics(raw.get("holdout")),
            holdout_aggregated=_dict(raw.get("holdout_aggregated")),
            failures=_strings(raw.get("failures")),
            rejected={k: {str(s): str(w) for s, w in _dict(v).items()}
                      for k, v in _dict(raw.get("rejected")).items()},
            stopped_for_privacy=_strings(raw.get("stopped_for_privacy")),
            central_dp=_dict(raw["central_dp"]) if isinstance(raw.get("central_dp"), dict) else None,
        )


@dataclass
class RunHistory:
    """history.json: the run's settings and one record per completed round."""

    run: RunInfo = field(default_factory=RunInfo)
    rounds: list[RoundRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run.__dict__.copy(), "rounds": [r.to_dict() for r in self.rounds]}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "history") -> RunHistory:
        if not isinstance(raw, dict) or not isinstance(raw.get("rounds"), list):
            raise HistoryError(
                f"{source}: expected an object with a 'rounds' list; the file is not a "
                "federation history (re-run the server or restore the file)"
            )
        rounds = [
            RoundRecord.from_dict(r, i)
            for i, r in enumerate(raw.get("rounds") or [], start=1)
            if isinstance(r, dict)
        ]
        return cls(RunInfo.from_dict(raw.get("run")), rounds)

    def write(self, run_dir: str | Path) -> Path:
        return write_json_atomic(Path(run_dir) / HISTORY_FILE, self.to_dict())


def read_history(run_dir: str | Path) -> RunHistory:
    """``RUN/history.json`` as a ``RunHistory``; one clear error when it cannot be."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        raise HistoryError(
            f"{path}: not found; pass the --out folder of a simulate or federation run "
            "(the coordinator writes history.json after every round)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HistoryError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
            "re-run the command that wrote it or remove the file"
        ) from None
    return RunHistory.from_dict(raw, str(path))
