"""A site's privacy ledger: every DP-SGD release made from its patients, kept on the site.

One JSON file in the site's state folder (``<state_dir>/privacy-ledger.json``) records, per
federation run, the DP settings fixed at the run's first round and every round of training
actually done, as the accountant's (noise multiplier, sample rate, steps) history. It is
written atomically after each round and BEFORE the update leaves the site, so a crash or a
restarted SuperNode can never forget spent budget; a round that is trained twice (e.g.
after a coordinator restart) is counted twice, because both updates were released.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from micromil_core.errors import ConfigError
from micromil_core.io import write_json_atomic

LEDGER_FILE = "privacy-ledger.json"
LEDGER_VERSION = 1


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a sequence of DP-SGD steps at ``delta`` with an Opacus accountant."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        # "optimal order is the largest alpha": the bound is valid, only not the tightest.
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(acc.get_epsilon(delta))


def exceeds(epsilon: float, budget: float) -> bool:
    """Whether ``epsilon`` is past ``budget`` (0 = no budget), allowing float rounding."""
    return budget > 0 and epsilon > budget * (1 + 1e-6)


@dataclass
class RunRecord:
    """DP-SGD at this site within one federation run."""

    accountant: str
    delta: float
    target_epsilon: float  # 0 = no budget (noise fixed by the site)
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    steps_per_round: int
    history: list[list[float]] = field(default_factory=list)  # [noise, rate, steps] per round
    rounds: list[dict[str, float]] = field(default_factory=list)  # {round, epsilon} per round

    def steps(self) -> list[tuple[float, float, int]]:
        """The accountant's history: (noise multiplier, sample rate, steps) per round."""
        return [(float(n), float(q), int(s)) for n, q, s in self.history]

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent so far, plus ``extra_steps`` more at this run's settings."""
        history = self.steps()
        if extra_steps:
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        return epsilon_of(history, self.delta, self.accountant)

    def would_exceed(self) -> bool:
        """Whether one more round would take this run past its budget."""
        return exceeds(self.epsilon(self.steps_per_round), self.target_epsilon)


class PrivacyLedger:
    """Load, update and save a site's ledger file (see module docstring)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.runs: dict[str, RunRecord] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            self.runs = {rid: RunRecord(**rec) for rid, rec in raw["runs"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            # Never start from zero on a damaged ledger: that would forget spent budget.
            raise ConfigError(
                f"privacy ledger {self.path} is unreadable ({exc}); restore it from backup. "
                "Training with DP stays blocked until it is readable, so budget is never reset"
            ) from None

    def save(self) -> None:
        payload: dict[str, Any] = {
            "version": LEDGER_VERSION,
            "runs": {rid: asdict(rec) for rid, rec in self.runs.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, payload)

    def run(self, run_id: str) -> RunRecord | None:
        return self.runs.get(run_id)

    def start_run(self, run_id: str, record: RunRecord) -> RunRecord:
        """The run's record; created (and saved) on its first round, then never changed."""
        if run_id not in self.runs:
            self.runs[run_id] = record
            self.save()
        return self.runs[run_id]

    def record_round(self, run_id: str, server_round: int, steps: int) -> float:
        """Add one round of ``steps`` DP-SGD steps; save; return the run's epsilon."""
        rec = self.runs[run_id]
        rec.history.append([rec.noise_multiplier, rec.sample_rate, int(steps)])
        eps = rec.epsilon()
        rec.rounds.append({"round": int(server_round), "epsilon": eps})
        self.save()
        return eps

    def total_epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon of ALL runs at this site composed (a patient's total exposure)."""
        history = [step for rec in self.runs.values() for step in rec.steps()]
        return epsilon_of(history, delta, accountant)
