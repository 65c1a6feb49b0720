"""One self-contained HTML report per federated run, readable offline by a site coordinator.

Reads ``RUN/history.json`` (written by the federation server, one entry per round), and when
present ``RUN/metrics.json`` (final held-out metrics) and ``RUN/compare.json`` (federated vs
pooled vs local baselines). Writes ``RUN/report.html``: inline CSS, PNG figures embedded as
base64 data URIs, no scripts and no external links, so the file can be mailed or copied onto
a hospital machine without network access.

Every piece but the round list is optional: a missing held-out site, ROC list or metric, or a
NaN, shows as "n/a" or drops its figure instead of failing the report.

``format_table`` renders the same metric rows as Markdown for the CLI.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from micromil_core.config import MIN_PATIENTS_FLOOR
from micromil_core.errors import MicroMILError
from micromil_core.io import write_text_atomic
from micromil_core.privacy.disclosure import suppressed_note
from micromil_core.training.metrics import METRIC_KEYS
from micromil_core.training.plots import _pyplot

__all__ = [
    "metric_text",
    "CORE_KEYS",
    "ReportError",
    "comparison_rows",
    "format_table",
    "render_report",
    "write_report",
]

CORE_KEYS: tuple[str, ...] = (*METRIC_KEYS, "n")
"""Columns of every metric table: the classification metrics plus the sample count."""

HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
COMPARE_FILE = "compare.json"
REPORT_FILE = "report.html"

_DPI = 100
# Comparison rows that are not per-site baselines, in display order.
_COMPARE_ORDER = ("federated", "pooled", "local_mean")
# compare.json's paired difference (not a row): federated minus pooled, same patients.
PAIRED_KEY = "federated_minus_pooled"


class ReportError(MicroMILError, ValueError):
    """A run folder lacks history.json, or one of its JSON files is malformed."""


# ----------------------------------------------------------------------------- formatting


def _num(value: Any) -> float | None:
    """A finite float, or None for missing, NaN, infinite or non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _nan(value: Any) -> float:
    """Like ``_num`` but NaN instead of None, for plotting arrays."""
    v = _num(value)
    return np.nan if v is None else v


def _fmt_metric(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:  # an interval [low, high]
        low, high = (_num(v) for v in value)
        return "n/a" if low is None or high is None else f"{low:.3f}–{high:.3f}"
    v = _num(value)
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
        return suppressed_note(int(_num(metrics.get("min_patients")) or MIN_PATIENTS_FLOOR))
    return _fmt_metric(key, metrics.get(key))


def _all_withheld(rounds: list[dict[str, Any]], phase: str, key: str) -> bool:
    """True if some site reported ``phase`` metrics and every one withheld ``key``."""
    reports = [_dict(m) for r in rounds for m in _dict(r.get(phase)).values()]
    return bool(reports) and all(key in (m.get("suppressed") or []) for m in reports)


def _withheld_note(rounds: list[dict[str, Any]], phase: str) -> str:
    limits = [_num(_dict(m).get("min_patients")) for r in rounds for m in _dict(r.get(phase)).values()]
    return suppressed_note(int(max((v for v in limits if v is not None), default=MIN_PATIENTS_FLOOR)))


def _fmt_bytes(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "n/a"
    size, unit = v, "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, next_unit
    return f"{int(v):,} B" if unit == "B" else f"{size:.1f} {unit} ({int(v):,} B)"


def _fmt_seconds(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "n/a"
    if v < 60:
        return f"{v:.1f} s"
    minutes, seconds = divmod(int(round(v)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _label(name: Any) -> str:
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
    flattened (``"local/site-0"``) and any other named approach are kept as they are.
    A row's bootstrap interval (``ci95``) adds its ``auc_ci95`` column.
    """
    rows: dict[str, dict[str, Any]] = {}
    for name in _COMPARE_ORDER:
        if isinstance(comparison.get(name), Mapping):
            rows[name] = dict(comparison[name])
    for name, metrics in comparison.items():
        if name in rows or name == PAIRED_KEY or not isinstance(metrics, Mapping):
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
        if isinstance(d, Mapping) and all(_num(d.get(k)) is not None for k in ("difference", "low", "high")):
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


# ----------------------------------------------------------------------------- history access


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _rounds(history: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in history.get("rounds") or [] if isinstance(r, dict)]


def _round_numbers(rounds: Sequence[Mapping[str, Any]]) -> list[int]:
    numbers = []
    for i, r in enumerate(rounds, start=1):
        n = _num(r.get("round"))
        numbers.append(int(n) if n is not None else i)
    return numbers


def _sites(rounds: Iterable[Mapping[str, Any]], section: str) -> list[str]:
    """Site names seen in ``round[section]`` over all rounds, in first-seen order."""
    seen: dict[str, None] = {}
    for r in rounds:
        for site in _dict(r.get(section)):
            seen.setdefault(str(site), None)
    return list(seen)


def _series(rounds: Sequence[Mapping[str, Any]], *path: str) -> list[float]:
    """Values at ``round[path[0]][path[1]]...`` for every round (NaN where missing)."""
    out = []
    for r in rounds:
        node: Any = r
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        out.append(_nan(node))
    return out


def _has_data(values: Sequence[float]) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=float)).any())


# ----------------------------------------------------------------------------- figures


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _line_panel(ax, x: Sequence[int], series: Mapping[str, tuple[Sequence[float], dict]]) -> int:
    """Draw each finite series over rounds; returns how many were drawn."""
    drawn = 0
    x_arr = np.asarray(x)
    for name, (values, style) in series.items():
        v = np.asarray(values, dtype=float)
        ok = np.isfinite(v)
        if ok.any():
            ax.plot(x_arr[ok], v[ok], marker="o", ms=3, label=_label(name), **style)
            drawn += 1
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    return drawn


def _curves_figure(
    x: Sequence[int],
    series: Mapping[str, tuple[Sequence[float], dict]],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> str | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    if not _line_panel(ax, x, series):
        plt.close(fig)
        return None
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    # Integer rounds only; a single round would otherwise get fractional ticks.
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png_uri(fig)


def _roc_figure(holdout: Mapping[str, Any], round_no: int) -> str | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    drawn = 0
    for site, m in holdout.items():
        m = _dict(m)
        fpr = np.asarray([_num(v) for v in m.get("roc_fpr") or []], dtype=float)
        tpr = np.asarray([_num(v) for v in m.get("roc_tpr") or []], dtype=float)
        if fpr.size < 2 or fpr.shape != tpr.shape or not np.isfinite(fpr + tpr).all():
            continue
        auc = _fmt_metric("auc", m.get("auc"))
        n = _fmt_metric("n", m.get("num-examples", m.get("n")))
        # The ROC points are the curve's corners; joining them gives the usual staircase.
        ax.plot(fpr, tpr, lw=1.6, label=_label(f"{site} (AUC {auc}, n={n})"))
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="chance")
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=f"ROC, held-out sites, round {round_no}",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    return _png_uri(fig)


def _grouped_bars(
    ax,
    groups: Sequence[str],
    bars: Mapping[str, Sequence[float]],
    ylabel: str,
    colors: Sequence[str] | None = None,
) -> int:
    """Bars per group (x axis) and per series (colour); NaN bars are left out.

    ``colors`` (one per group) colours a single series by group instead of by series.
    Returns how many series had a finite bar.
    """
    names = list(bars)
    if not names or not groups:
        return 0
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    drawn = 0
    for i, name in enumerate(names):
        v = np.asarray(bars[name], dtype=float)
        ok = np.isfinite(v)
        if ok.any():
            color = [colors[j] for j in np.flatnonzero(ok)] if colors and len(names) == 1 else None
            offset = (i - (len(names) - 1) / 2) * width
            ax.bar(x[ok] + offset, v[ok], width, label=_label(name), color=color)
            drawn += 1
    labels = [_label(g) for g in groups]
    # Round numbers fit side by side; site names and metric keys soon collide.
    crowded = sum(len(t) for t in labels) > 45
    ax.set_xticks(x)
    ax.set_xticklabels(
        labels, rotation=30 if crowded else 0, ha="right" if crowded else "center", fontsize=8
    )
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if drawn and len(names) > 1:
        # Outside the axes so it never hides a bar; savefig's tight bbox keeps it in view.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return drawn


def _bars_figure(
    groups: Sequence[str],
    bars: Mapping[str, Sequence[float]],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    colors: Sequence[str] | None = None,
) -> str | None:
    plt = _pyplot()
    width = min(11.0, max(4.5, 0.45 * len(groups) * len(bars) ** 0.5 + 3))
    fig, ax = plt.subplots(figsize=(width, 3.4))
    if not _grouped_bars(ax, groups, bars, ylabel, colors):
        plt.close(fig)
        return None
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return _png_uri(fig)


def _train_sites_figure(
    sites: Sequence[str], loss: Sequence[float], auc: Sequence[float], round_no: int
) -> str | None:
    if not (_has_data(loss) or _has_data(auc)):
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(max(7.0, 1.4 * len(sites) + 4), 3.2))
    _grouped_bars(ax_loss, sites, {"train loss": loss}, "train loss")
    ax_loss.set_title(f"train loss, round {round_no}")
    if not _grouped_bars(ax_auc, sites, {"validation AUC": auc}, "validation AUC"):
        ax_auc.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_auc.transAxes)
    ax_auc.set_ylim(0, 1.02)
    ax_auc.set_title(f"validation AUC, round {round_no}")
    fig.tight_layout()
    return _png_uri(fig)


def _communication_figure(
    x: Sequence[int], sent: Sequence[float], received: Sequence[float], wall: Sequence[float]
) -> str | None:
    if not (_has_data(sent) or _has_data(received) or _has_data(wall)):
        return None
    plt = _pyplot()
    fig, (ax_bytes, ax_wall) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    scale, unit = 1.0, "B"
    peak = np.nanmax(np.concatenate([np.asarray(sent, float), np.asarray(received, float), [0.0]]))
    for s, u in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if peak >= s:
            scale, unit = float(s), u
            break
    labels = [str(r) for r in x]
    bars = {
        "sent": np.asarray(sent, float) / scale,
        "received": np.asarray(received, float) / scale,
    }
    if not _grouped_bars(ax_bytes, labels, bars, unit):
        ax_bytes.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_bytes.transAxes)
    ax_bytes.set(xlabel="round", title="bytes per round")
    if not _grouped_bars(ax_wall, labels, {"wall seconds": wall}, "seconds"):
        ax_wall.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_wall.transAxes)
    ax_wall.set(xlabel="round", title="wall time per round")
    fig.tight_layout()
    return _png_uri(fig)


# ----------------------------------------------------------------------------- HTML pieces

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1000px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3b6ea5; padding-bottom: .2em; }
h2 { font-size: 1.25em; color: #3b6ea5; margin-top: 2em; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #eef3f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.na { color: #999; text-align: right; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0 1em; }
.note { color: #666; font-size: .9em; }
.fail { color: #a33; }
footer { margin-top: 3em; color: #888; font-size: .85em; }
"""


def _td(text: str, numeric: bool = True) -> str:
    if text == "n/a" or text.startswith("suppressed"):
        return f'<td class="na">{_esc(text)}</td>'
    return f'<td class="num">{_esc(text)}</td>' if numeric else f"<td>{_esc(text)}</td>"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_td(c, numeric=i >= numeric_from) for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric_table(rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str], first: str) -> str:
    return _html_table(
        [first, *keys],
        [[str(name), *(metric_text(_dict(m), k) for k in keys)] for name, m in rows.items()],
    )


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<p class="note">{_esc(alt)}: n/a (no finite values).</p>'
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_esc(heading)}</h2>\n{body}\n</section>'


# ----------------------------------------------------------------------------- sections


def _summary_section(history: Mapping[str, Any], rounds: list[dict[str, Any]]) -> str:
    run = _dict(history.get("run"))
    sent = [_num(r.get("bytes_sent")) for r in rounds]
    received = [_num(r.get("bytes_received")) for r in rounds]
    wall = [_num(r.get("wall_seconds")) for r in rounds]

    def total(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def per_round(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    def names(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value)) if value else "none"
        return "n/a" if value is None else str(value)

    planned = run.get("rounds")
    rounds_text = f"{len(rounds)} completed"
    if _num(planned) is not None:
        rounds_text += f" of {int(_num(planned))} planned"
    sent_pr, recv_pr = per_round(sent), per_round(received)
    rows = [
        ("model", names(run.get("model"))),
        ("strategy", names(run.get("strategy"))),
        ("rounds", rounds_text),
        ("local epochs per round", names(run.get("local_epochs"))),
        ("training sites", names(run.get("train_sites"))),
        ("held-out sites", names(run.get("holdout_sites"))),
        ("seed", names(run.get("seed"))),
        ("started", names(run.get("started"))),
        ("wall time (sum over rounds)", _fmt_seconds(total(wall))),
        ("bytes sent (total)", _fmt_bytes(total(sent))),
        ("bytes received (total)", _fmt_bytes(total(received))),
        ("bytes sent per round (mean)", _fmt_bytes(sent_pr)),
        ("bytes received per round (mean)", _fmt_bytes(recv_pr)),
    ]
    table = (
        "<table><tbody>"
        + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )
    return _section("summary", "Run summary", table)


def _final_holdout(
    rounds: list[dict[str, Any]],
) -> tuple[int | None, dict[str, Any], dict[str, Any]]:
    """(round number, per-site metrics, aggregated metrics) of the last round with held-out data."""
    numbers = _round_numbers(rounds)
    for number, r in zip(reversed(numbers), reversed(rounds), strict=True):
        holdout = {str(k): _dict(v) for k, v in _dict(r.get("holdout")).items()}
        if holdout or _dict(r.get("holdout_aggregated")):
            return number, holdout, _dict(r.get("holdout_aggregated"))
    return None, {}, {}


def _holdout_section(metrics: Mapping[str, Any] | None, rounds: list[dict[str, Any]]) -> str:
    if metrics:
        rows: dict[str, Mapping[str, Any]] = {"all held-out sites": metrics}
        rows.update({str(s): _dict(m) for s, m in _dict(metrics.get("per_site")).items()})
        source = f"From {METRICS_FILE} (final model)."
    else:
        number, per_site, aggregated = _final_holdout(rounds)
        if number is None:
            return _section(
                "holdout",
                "Held-out metrics",
                '<p class="note">n/a: this run has no held-out sites.</p>',
            )
        rows = {"all held-out sites": aggregated} if aggregated else {}
        for site, m in per_site.items():
            rows[site] = {**m, "n": m.get("n", m.get("num-examples"))}
        source = f"From the history, round {number} ({METRICS_FILE} not found)."
    rows = {name: with_auc_interval(m) for name, m in rows.items()}
    body = f'<p class="note">{_esc(source)}</p>' + _metric_table(rows, table_keys(rows), "held-out")
    return _section("holdout", "Held-out metrics", body)


def _curves_section(rounds: list[dict[str, Any]]) -> str:
    x = _round_numbers(rounds)
    thin = {"lw": 0.9, "alpha": 0.8}
    bold = {"lw": 2.2, "color": "black"}

    loss: dict[str, tuple[Sequence[float], dict]] = {
        "aggregated": (_series(rounds, "train_aggregated", "train_loss"), bold)
    }
    for site in _sites(rounds, "train"):
        loss[site] = (_series(rounds, "train", site, "train_loss"), thin)

    # Validation of the training sites: the evaluate step when the server ran one, else the
    # val_auc each site reported alongside its fit.
    val: dict[str, tuple[Sequence[float], dict]] = {
        "aggregated (evaluate)": (_series(rounds, "evaluate_aggregated", "auc"), bold),
        "aggregated (fit)": (
            _series(rounds, "train_aggregated", "val_auc"),
            {"lw": 2.0, "color": "dimgray", "ls": "--"},
        ),
    }
    for site in _sites(rounds, "train"):
        per_site = _series(rounds, "evaluate", site, "auc")
        if not _has_data(per_site):
            per_site = _series(rounds, "train", site, "val_auc")
        val[site] = (per_site, thin)

    held: dict[str, tuple[Sequence[float], dict]] = {}
    for site in _sites(rounds, "holdout"):
        held[f"{site} AUC"] = (_series(rounds, "holdout", site, "auc"), {"lw": 1.6})
        held[f"{site} accuracy"] = (
            _series(rounds, "holdout", site, "accuracy"),
            {"lw": 1.2, "ls": "--"},
        )

    body = "\n".join(
        [
            "<h3>Training loss</h3>",
            _img(
                _curves_figure(x, loss, "train loss", "train loss per round"),
                "train loss per round",
            ),
            "<h3>Validation AUC of the training sites</h3>",
            _img(
                _curves_figure(x, val, "AUC", "validation AUC per round", (0, 1.02)),
                "validation AUC per round",
            )
            if not _all_withheld(rounds, "evaluate", "auc")
            else '<p class="note">validation AUC per round: '
            + _esc(_withheld_note(rounds, "evaluate"))
            + " at every training site (small-count guard: the validation sets are smaller).</p>",
            "<h3>Held-out sites</h3>",
            _img(
                _curves_figure(x, held, "metric", "held-out AUC and accuracy per round", (0, 1.02)),
                "held-out AUC and accuracy per round",
            )
            if held
            else '<p class="note">n/a: this run has no held-out sites.</p>',
        ]
    )
    return _section("curves", "Learning curves", body)


def _roc_section(rounds: list[dict[str, Any]]) -> str:
    number, per_site, _ = _final_holdout(rounds)
    if number is None:
        body = '<p class="note">n/a: this run has no held-out sites.</p>'
    else:
        uri = _roc_figure(per_site, number)
        body = (
            _img(uri, "ROC curves")
            if uri
            else ('<p class="note">n/a: the history holds no ROC points (roc_fpr / roc_tpr).</p>')
        )
    return _section("roc", "ROC curves (held-out sites, final round)", body)


def _sites_section(rounds: list[dict[str, Any]]) -> str:
    parts = []
    number, per_site, _ = _final_holdout(rounds)
    if number is not None and per_site:
        sites = list(per_site)
        # Metrics along x and one colour per site: readable for one site or several.
        bars = {s: [_nan(per_site[s].get(k)) for k in METRIC_KEYS] for s in sites}
        # A lone series gets no legend, so name its site in the title.
        title = sites[0] if len(sites) == 1 else "per site"
        parts += [
            f"<h3>Held-out sites, round {number}</h3>",
            _img(
                _bars_figure(METRIC_KEYS, bars, "metric", f"held-out metrics, {title}", (0, 1.05)),
                "held-out metrics per site",
            ),
        ]
    else:
        parts.append('<p class="note">Held-out sites: n/a (none in this run).</p>')

    if rounds:
        last = rounds[-1]
        number = _round_numbers(rounds)[-1]
        train = {str(k): _dict(v) for k, v in _dict(last.get("train")).items()}
        evaluate = {str(k): _dict(v) for k, v in _dict(last.get("evaluate")).items()}
        sites = list(dict.fromkeys([*train, *evaluate]))
        if sites:

            # A training site's validation metrics are its evaluation reply's.
            loss = [_nan(train.get(s, {}).get("train_loss")) for s in sites]
            auc = [_nan(evaluate.get(s, {}).get("auc")) for s in sites]
            table_rows = []
            for s in sites:
                t, e = train.get(s, {}), evaluate.get(s, {})
                table_rows.append(
                    [
                        s,
                        _fmt_metric("n", t.get("num-examples")),
                        metric_text(t, "train_loss"),
                        _fmt_metric("n", e.get("num-examples")),
                        metric_text(e, "loss"),
                        metric_text(e, "auc"),
                        _fmt_metric("epsilon", t.get("epsilon")),
                    ]
                )
            parts += [
                f"<h3>Training sites, round {number}</h3>",
                _img(_train_sites_figure(sites, loss, auc, number), "training sites"),
                _html_table(
                    ["site", "train patients", "train loss", "val patients", "val loss", "val AUC",
                     "DP epsilon"],
                    table_rows,
                ),
            ]
    return _section("sites", "Per-site results", "\n".join(parts))


def _communication_section(rounds: list[dict[str, Any]]) -> str:
    x = _round_numbers(rounds)
    sent = _series(rounds, "bytes_sent")
    received = _series(rounds, "bytes_received")
    wall = _series(rounds, "wall_seconds")
    table = _html_table(
        ["round", "wall time", "bytes sent", "bytes received"],
        [
            [str(n), _fmt_seconds(w), _fmt_bytes(s), _fmt_bytes(r)]
            for n, w, s, r in zip(x, wall, sent, received, strict=True)
        ],
    )
    body = _img(_communication_figure(x, sent, received, wall), "communication per round") + table
    return _section("communication", "Communication", body)


def _failures_section(rounds: list[dict[str, Any]]) -> str:
    items = []
    for number, r in zip(_round_numbers(rounds), rounds, strict=True):
        failures = r.get("failures") or []
        if isinstance(failures, str):
            failures = [failures]
        if failures:
            entries = "".join(f'<li class="fail">{_esc(f)}</li>' for f in failures)
            items.append(f"<li>round {number}<ul>{entries}</ul></li>")
    body = f"<ul>{''.join(items)}</ul>" if items else "<p>No failures recorded.</p>"
    return _section("failures", "Failures", body)


def _comparison_section(comparison: Mapping[str, Any] | None) -> str:
    if not comparison:
        return ""
    rows = comparison_rows(comparison)
    if not rows:
        return ""
    names = list(rows)
    auc = [_nan(rows[n].get("auc")) for n in names]
    # One colour per kind of setup, all local/<site> baselines sharing grey.
    palette = {"federated": "C0", "pooled": "C1", "local_mean": "C2"}
    colors = [palette.get(n, "C7") for n in names]
    uri = _bars_figure(
        names, {"AUC": auc}, "AUC", "held-out AUC by training setup", (0, 1.05), colors
    )
    paired = format_paired_difference(comparison)
    body = (
        _metric_table(rows, table_keys(rows), "setup")
        + (f"<p>{_esc(paired)}</p>" if paired else "")
        + _img(uri, "AUC by training setup")
    )
    return _section("comparison", "Federated vs pooled vs local", body)


# ----------------------------------------------------------------------------- entry points


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
            "re-run the command that wrote it or remove the file"
        ) from exc


def render_report(
    history: Mapping[str, Any],
    *,
    metrics: Mapping[str, Any] | None = None,
    comparison: Mapping[str, Any] | None = None,
    title: str = "micromil-fl run report",
) -> str:
    """The report as one HTML string (see the module docstring for its sections).

    Args:
        history: the parsed history.json (``{"run": {...}, "rounds": [...]}``).
        metrics: the parsed metrics.json, or None to fall back on the history's last round.
        comparison: the parsed compare.json, or None to leave that section out.
        title: the page heading.
    """
    if not isinstance(history, Mapping) or not isinstance(history.get("rounds", []), list):
        raise ReportError(
            f"history must be an object with a 'rounds' list; got {type(history).__name__}"
        )
    rounds = _rounds(history)
    plt = _pyplot()
    with plt.style.context("default"):
        sections = [
            _summary_section(history, rounds),
            _holdout_section(metrics if isinstance(metrics, Mapping) else None, rounds),
            _curves_section(rounds) if rounds else "",
            _roc_section(rounds),
            _sites_section(rounds),
            _communication_section(rounds) if rounds else "",
            _failures_section(rounds),
            _comparison_section(comparison if isinstance(comparison, Mapping) else None),
        ]
    nav = " · ".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in re.findall(r'<section id="([a-z]+)">\n<h2>([^<]*)</h2>', "\n".join(sections))
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_esc(title)}</h1>",
            f"<nav>{nav}</nav>",
            *[s for s in sections if s],
            "<footer>Generated by micromil-fl from the run's history.json. "
            "All figures are embedded; this file needs no network access.</footer>",
            "</body></html>",
            "",
        ]
    )


def write_report(
    run_dir: str | Path,
    title: str | None = None,
    *,
    comparison: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/report.html`` from the run's JSON files and return its path.

    Args:
        run_dir: a run folder holding history.json, and optionally metrics.json and
            compare.json.
        title: page heading; defaults to "micromil-fl run: <folder name>".
        comparison: baseline comparison (compare.json schema); overrides compare.json.

    Raises:
        ReportError: history.json is missing or malformed.
    """
    run_dir = Path(run_dir)
    history_path = run_dir / HISTORY_FILE
    if not history_path.is_file():
        raise ReportError(
            f"{history_path}: not found; point the report at a run folder written by the "
            "federation server (it holds history.json)"
        )
    history = _read_json(history_path)
    if not isinstance(history, dict) or not isinstance(history.get("rounds"), list):
        raise ReportError(
            f"{history_path}: expected an object with a 'rounds' list; the file is not a "
            "federation history (re-run the server or restore the file)"
        )
    metrics_path = run_dir / METRICS_FILE
    metrics = _read_json(metrics_path) if metrics_path.is_file() else None
    if comparison is None and (run_dir / COMPARE_FILE).is_file():
        comparison = _read_json(run_dir / COMPARE_FILE)
    page = render_report(
        history,
        metrics=metrics,
        comparison=comparison,
        title=title or f"micromil-fl run: {run_dir.resolve().name}",
    )
    return write_text_atomic(run_dir / REPORT_FILE, page)
