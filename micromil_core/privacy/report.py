"""What a run spent in privacy, read from its history (server side) or a site's ledger.

``budget_stops`` is how the coordinator learns that a site must stop: each DP site reports
its epsilon so far and the epsilon one more round would bring (``epsilon_next``) with its
budget; the coordinator stops asking a site whose next round would exceed it.
``privacy_report`` turns a run folder's history.json into the table of ``micromil
privacy-report``: epsilon per site per round, budgets and settings, and central DP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from micromil_core.errors import ConfigError
from micromil_core.federated.history import HistoryError, read_history
from micromil_core.privacy.ledger import LEDGER_FILE, PrivacyLedger, exceeds

SETTINGS = ("delta", "epsilon_budget", "noise_multiplier", "sample_rate", "max_grad_norm", "dp_steps")


def over_budget(metrics: dict[str, Any]) -> bool:
    """Whether a site's last train metrics say its next round would exceed its budget."""
    nxt = metrics.get("epsilon_next")
    return isinstance(nxt, (int, float)) and exceeds(nxt, float(metrics.get("epsilon_budget") or 0.0))


def budget_message(site: str, metrics: dict[str, Any]) -> str:
    return (
        f"{site} stops contributing: its privacy budget is epsilon {metrics['epsilon_budget']:g} "
        f"(delta {metrics.get('delta', math.nan):g}); it has spent {metrics['epsilon']:.2f} and "
        f"another round would reach {metrics['epsilon_next']:.2f}"
    )


def budget_stops(train_replies: Iterable[Mapping[str, dict[str, Any]]]) -> dict[str, str]:
    """Sites whose latest train metrics leave no budget for another round, with the message
    saying so; ``train_replies`` is each round's {site: train metrics}, oldest first."""
    latest: dict[str, dict[str, Any]] = {}
    for per_site in train_replies:
        latest.update(per_site)
    return {site: budget_message(site, m) for site, m in sorted(latest.items()) if over_budget(m)}


def privacy_report(run_dir: str | Path) -> dict[str, Any]:
    """Epsilon per site per round, each site's settings, and central DP, from history.json."""
    try:
        history = read_history(run_dir)
    except HistoryError as exc:
        raise ConfigError(str(exc)) from None
    sites: dict[str, dict[str, Any]] = {}
    central: list[dict[str, Any]] = []
    for record in history.rounds:
        for site, m in record.train.items():
            if "epsilon" not in m:
                continue
            rec = sites.setdefault(site, {"epsilon": {}, "settings": {}})
            rec["epsilon"][record.round] = float(m["epsilon"])
            rec["settings"] = {k: m[k] for k in SETTINGS if k in m}
        if record.central_dp is not None:
            central.append({"round": record.round, **record.central_dp})
    stops = budget_stops(r.train for r in history.rounds)
    return {
        "run": history.run.__dict__.copy(),
        "rounds": [r.round for r in history.rounds],
        "sites": {
            site: {**rec, "stopped": site in stops, "final_epsilon": max(rec["epsilon"].values())}
            for site, rec in sorted(sites.items())
        },
        "non_dp_sites": sorted({s for r in history.rounds for s in r.train} - set(sites)),
        "central": central,
        "stops": stops,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one row per round, one column per DP site."""
    lines: list[str] = []
    sites = report["sites"]
    if sites:
        names = list(sites)
        lines.append("Local DP-SGD (privacy unit: one patient) - epsilon spent per site")
        lines.append("round  " + "  ".join(f"{n:>12}" for n in names))
        for rnd in report["rounds"]:
            cells = [sites[n]["epsilon"].get(rnd) for n in names]
            lines.append(f"{rnd:>5}  " + "  ".join(
                f"{c:>12.3f}" if c is not None else f"{'-':>12}" for c in cells
            ))
        lines.append("")
        for n, rec in sites.items():
            s = rec["settings"]
            budget = s.get("epsilon_budget", 0) or "none"
            lines.append(
                f"{n}: epsilon {rec['final_epsilon']:.3f} of budget {budget} at delta "
                f"{s.get('delta', math.nan):g}; noise multiplier {s.get('noise_multiplier', math.nan):.3f}, "
                f"sampling rate {s.get('sample_rate', math.nan):.3g}, clipping {s.get('max_grad_norm', math.nan):g}"
                + ("; stopped at its budget" if rec["stopped"] else "")
            )
    if report["non_dp_sites"]:
        lines.append("Sites without local DP: " + ", ".join(report["non_dp_sites"]))
    if report["central"]:
        last = report["central"][-1]
        eps = last.get("epsilon")
        # history.json is strict JSON: an unbounded epsilon (no noise) is stored as null.
        eps_text = f"{eps:.3f}" if isinstance(eps, (int, float)) and math.isfinite(eps) else "unbounded"
        lines.append("")
        lines.append(
            f"Central DP ({last.get('mode', '?')}, privacy unit: one site's update): epsilon "
            f"{eps_text} at delta {last.get('delta', math.nan):g} after "
            f"round {last['round']} (noise multiplier {last.get('noise_multiplier', math.nan):g})"
        )
    if not lines:
        lines.append("No differential privacy in this run (no site reported epsilon; no central DP).")
    return "\n".join(lines)


def ledger_report(state_dir: str | Path) -> str:
    """A site's own view: every run in its ledger and the total over all of them."""
    ledger = PrivacyLedger(state_dir)
    if not ledger.runs:
        return f"{Path(state_dir) / LEDGER_FILE}: no DP training recorded"
    lines = [f"Privacy ledger {ledger.path}"]
    deltas = []
    for run_id, rec in ledger.runs.items():
        eps = rec.epsilon()
        deltas.append(rec.delta)
        budget = rec.target_epsilon or "none"
        lines.append(
            f"run {run_id}: {len(rec.rounds)} rounds, epsilon {eps:.3f} of budget {budget} at delta "
            f"{rec.delta:g} (noise {rec.noise_multiplier:.3f}, rate {rec.sample_rate:.3g}, clip {rec.max_grad_norm:g})"
        )
    delta = max(deltas)
    lines.append(f"all runs composed: epsilon {ledger.total_epsilon(delta):.3f} at delta {delta:g}")
    return "\n".join(lines)
