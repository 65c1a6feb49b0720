"""Metric values as a person reads them: numbers, intervals, "n/a", "suppressed (n < 5)",
and the Markdown tables the CLI prints (the HTML report uses the same cells)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from micromil_core.config import MIN_PATIENTS_FLOOR
from micromil_core.privacy.disclosure import suppressed_note
from micromil_core.training.metrics import METRIC_KEYS

CORE_KEYS: tuple[str, ...] = (*METRIC_KEYS, "n")
"""Columns of every metric table: the classification metrics plus the sample count."""

# Comparison rows that are not per-site baselines, in display order.
_COMPARE_ORDER = ("federated", "pooled", "local_mean")
# compare.json's paired difference (not a row): federated minus pooled, same patients.
PAIRED_KEY = "federated_minus_pooled"
# compare.json's per-training-site comparison under personalisation (report.personal), not a
# setup judged on the held-out sites, so not a row either.
OWN_PATIENTS_KEY = "own_patients"
_NOT_ROWS = (PAIRED_KEY, OWN_PATIENTS_KEY)




def finite(value: Any) -> float | None:
    """A finite float, or None for missing, NaN, infinite or non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def finite_or_nan(value: Any) -> float:
    """Like ``finite`` but NaN instead of None, for plotting arrays."""
    v = finite(value)
    return math.nan if v is None else v


def format_metric(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:  # an interval [low, high]
        low, high = (finite(v) for v in value)
        return "n/a" if low is None or high is None else f"{low:.3f}–{high:.3f}"
    v = finite(value)
    if v is None:
        return "n/a"
    if key in ("n", "num-examples") or (v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.3f}"


def metric_text(metrics: Mapping[str, Any], key: str) -> str:
    """A metric as a person reads it: its value, "n/a", or "suppressed (n < 5)" when the
    site withheld it under the small-count guard (``privacy.disclosure``)."""
    withheld = metrics.get("suppressed")
    if isinstance(withheld, (list, tuple)) and key in withheld:
        return suppressed_note(int(finite(metrics.get("min_patients")) or MIN_PATIENTS_FLOOR))
    return format_metric(key, metrics.get(key))



def format_bytes(value: Any) -> str:
    v = finite(value)
    if v is None:
        return "n/a"
    size, unit = v, "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, next_unit
    return f"{int(v):,} B" if unit == "B" else f"{size:.1f} {unit} ({int(v):,} B)"


def format_seconds(value: Any) -> str:
    v = finite(value)
    if v is None:
        return "n/a"
    if v < 60:
        return f"{v:.1f} s"
    minutes, seconds = divmod(int(round(v)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def plot_label(name: Any) -> str:
    """A matplotlib-safe legend label: no mathtext from '$', not hidden by a leading '_'."""
    text = str(name).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def format_table(
    rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = CORE_KEYS, *, row_header: str = ""
) -> str:
    """Markdown table: one row per entry of ``rows``, one column per key ("n/a" when missing).

    >>> print(format_table({"federated": {"auc": 0.8123, "n": 40}}, ["auc", "n"]))
    |  | auc | n |
    |---|---:|---:|
    | federated | 0.812 | 40 |
    """
    keys = list(keys)

    def cell(text: Any) -> str:
        return str(text).replace("|", r"\|")

    lines = [
        "| " + " | ".join([cell(row_header), *map(cell, keys)]) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, metrics in rows.items():
        metrics = metrics if isinstance(metrics, Mapping) else {}
        values = [metric_text(metrics, k) for k in keys]
        lines.append("| " + " | ".join([cell(name), *values]) + " |")
    return "\n".join(lines)


def table_keys(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """Columns of a metric table: ``CORE_KEYS``, with the AUC interval when a row has one.

    A row's interval is ``auc_ci95`` ([low, high]) or a site's ``auc_ci_low``/``auc_ci_high``
    pair as the federation reports it (:func:`with_auc_interval` turns the one into the other).
    """
    if any("auc_ci95" in m for m in rows.values()):
        return ("auc", "auc_ci95", *CORE_KEYS[1:])
    return CORE_KEYS


def comparison_rows(comparison: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flatten compare.json into table rows: federated, pooled, local_mean, local/<site>.

    A nested ``{"local": {site: metrics}}`` becomes ``local/<site>`` rows; rows already
    flattened (``"local/site-0"``) and any other named approach are kept as they are; the
    paired difference and ``own_patients`` are not setups, so not rows.
    A row's bootstrap interval (``ci95``) adds its ``auc_ci95`` column.
    """
    rows: dict[str, dict[str, Any]] = {}
    for name in _COMPARE_ORDER:
        if isinstance(comparison.get(name), Mapping):
            rows[name] = dict(comparison[name])
    for name, metrics in comparison.items():
        if name in rows or name in _NOT_ROWS or not isinstance(metrics, Mapping):
            continue
        if name == "local":
            for site, site_metrics in metrics.items():
                if isinstance(site_metrics, Mapping):
                    rows[f"local/{site}"] = dict(site_metrics)
        else:
            rows[name] = dict(metrics)
    for metrics in rows.values():
        ci = metrics.get("ci95")
        if isinstance(ci, Mapping) and "auc" in ci:
            metrics["auc_ci95"] = ci["auc"]
    return rows


def with_auc_interval(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` plus ``auc_ci95`` when it carries a site's ``auc_ci_low``/``auc_ci_high``."""
    out = dict(metrics)
    if "auc_ci_low" in out and "auc_ci_high" in out:
        out["auc_ci95"] = [out["auc_ci_low"], out["auc_ci_high"]]
    return out


def format_differences(paired: Any, keys: Sequence[str] = ("auc", "accuracy")) -> str:
    """``paired_bootstrap_difference``'s AUC and accuracy as "auc +0.010 (95% CI ... to
    ...); accuracy ...", or "" when there is none."""
    if not isinstance(paired, Mapping):
        return ""
    parts = []
    for key in keys:
        d = paired.get(key)
        if isinstance(d, Mapping) and all(finite(d.get(k)) is not None for k in ("difference", "low", "high")):
            parts.append(
                f"{key} {d['difference']:+.3f} (95% CI {d['low']:+.3f} to {d['high']:+.3f})"
            )
    return "; ".join(parts)


def format_paired_difference(comparison: Mapping[str, Any]) -> str:
    """One sentence on federated minus pooled (AUC and accuracy), or "" when not known."""
    text = format_differences(comparison.get(PAIRED_KEY))
    if not text:
        return ""
    return f"federated minus pooled, on the same held-out patients (paired bootstrap): {text}"

