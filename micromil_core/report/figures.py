"""The report's figures, each a PNG embedded as a base64 data URI (None when there is
nothing finite to draw)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from micromil_core.report.tables import finite, format_metric, plot_label
from micromil_core.training.plots import pyplot

_DPI = 100


def has_data(values: Sequence[float]) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=float)).any())




def png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def line_panel(ax, x: Sequence[int], series: Mapping[str, tuple[Sequence[float], dict]]) -> int:
    """Draw each finite series over rounds; returns how many were drawn."""
    drawn = 0
    x_arr = np.asarray(x)
    for name, (values, style) in series.items():
        v = np.asarray(values, dtype=float)
        ok = np.isfinite(v)
        if ok.any():
            ax.plot(x_arr[ok], v[ok], marker="o", ms=3, label=plot_label(name), **style)
            drawn += 1
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    return drawn


def curves_figure(
    x: Sequence[int],
    series: Mapping[str, tuple[Sequence[float], dict]],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> str | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    if not line_panel(ax, x, series):
        plt.close(fig)
        return None
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    # Integer rounds only; a single round would otherwise get fractional ticks.
    ax.xaxis.get_major_locator().set_params(integer=True)
    return png_uri(fig)


def roc_figure(holdout: Mapping[str, Any], round_no: int) -> str | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    drawn = 0
    for site, m in holdout.items():
        fpr = np.asarray([finite(v) for v in m.get("roc_fpr") or []], dtype=float)
        tpr = np.asarray([finite(v) for v in m.get("roc_tpr") or []], dtype=float)
        if fpr.size < 2 or fpr.shape != tpr.shape or not np.isfinite(fpr + tpr).all():
            continue
        auc = format_metric("auc", m.get("auc"))
        n = format_metric("n", m.get("num-examples", m.get("n")))
        # The ROC points are the curve's corners; joining them gives the usual staircase.
        ax.plot(fpr, tpr, lw=1.6, label=plot_label(f"{site} (AUC {auc}, n={n})"))
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
    return png_uri(fig)


def grouped_bars(
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
            ax.bar(x[ok] + offset, v[ok], width, label=plot_label(name), color=color)
            drawn += 1
    labels = [plot_label(g) for g in groups]
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


def bars_figure(
    groups: Sequence[str],
    bars: Mapping[str, Sequence[float]],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    colors: Sequence[str] | None = None,
) -> str | None:
    plt = pyplot()
    width = min(11.0, max(4.5, 0.45 * len(groups) * len(bars) ** 0.5 + 3))
    fig, ax = plt.subplots(figsize=(width, 3.4))
    if not grouped_bars(ax, groups, bars, ylabel, colors):
        plt.close(fig)
        return None
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return png_uri(fig)


def train_sites_figure(
    sites: Sequence[str], loss: Sequence[float], auc: Sequence[float], round_no: int
) -> str | None:
    if not (has_data(loss) or has_data(auc)):
        return None
    plt = pyplot()
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(max(7.0, 1.4 * len(sites) + 4), 3.2))
    grouped_bars(ax_loss, sites, {"train loss": loss}, "train loss")
    ax_loss.set_title(f"train loss, round {round_no}")
    if not grouped_bars(ax_auc, sites, {"validation AUC": auc}, "validation AUC"):
        ax_auc.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_auc.transAxes)
    ax_auc.set_ylim(0, 1.02)
    ax_auc.set_title(f"validation AUC, round {round_no}")
    fig.tight_layout()
    return png_uri(fig)


def communication_figure(
    x: Sequence[int], sent: Sequence[float], received: Sequence[float], wall: Sequence[float]
) -> str | None:
    if not (has_data(sent) or has_data(received) or has_data(wall)):
        return None
    plt = pyplot()
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
    if not grouped_bars(ax_bytes, labels, bars, unit):
        ax_bytes.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_bytes.transAxes)
    ax_bytes.set(xlabel="round", title="bytes per round")
    if not grouped_bars(ax_wall, labels, {"wall seconds": wall}, "seconds"):
        ax_wall.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax_wall.transAxes)
    ax_wall.set(xlabel="round", title="wall time per round")
    fig.tight_layout()
    return png_uri(fig)

