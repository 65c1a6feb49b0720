"""PNG figures for runs: ROC curves and learning curves (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from micromil_core.io import atomic_path
from micromil_core.training.metrics import binary_roc, roc_auc


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return Path(path)


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC"
) -> Path | None:
    """One ROC curve per entry ``name -> (y_true (n,), probs (n, C))``; class 1 vs rest."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    drawn = 0
    for name, (y, probs) in curves.items():
        roc = binary_roc(y, probs)
        if roc is None:
            continue
        fpr, tpr = roc
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y, probs):.3f}, n={len(y)})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def curves_figure(
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    title: str,
    *,
    x: Sequence[int] | None = None,
    best: int | None = None,
):
    """Learning curves as a matplotlib figure: losses in the top panel, every other series
    (AUC, accuracy) in the bottom one, so the two scales never share an axis.

    Args:
        series: name -> one value per epoch/round (NaNs skipped); a name containing
            "loss" goes to the loss panel.
        xlabel: what the x axis counts ("epoch", "round").
        title: the figure's title.
        x: the epoch/round numbers (default 1, 2, ...), e.g. when a second training stage
            numbers its epochs on from the first.
        best: the selected epoch/round, drawn as a dashed line in every panel.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    # A series with no finite value (no validation split) would leave an empty panel.
    series = {n: v for n, v in series.items() if np.isfinite(np.asarray(v, dtype=float)).any()}
    loss = {n: v for n, v in series.items() if "loss" in n.lower()}
    other = {n: v for n, v in series.items() if n not in loss}
    panels = [(g, label) for g, label in ((loss, "loss"), (other, _metric_label(other))) if g]
    fig, axes = plt.subplots(
        max(len(panels), 1), 1, sharex=True, squeeze=False,
        figsize=(6, 0.8 + 2.4 * max(len(panels), 1)), layout="constrained",
    )
    for ax, (group, ylabel) in zip(axes[:, 0], panels, strict=False):
        for name, values in group.items():
            v = np.asarray(values, dtype=float)
            steps = np.asarray(x if x is not None else np.arange(1, len(v) + 1))
            ok = np.isfinite(v)
            ax.plot(steps[ok], v[ok], marker=".", label=name)
        if ylabel == "AUC":
            ax.set_ylim(0, 1.02)
        if best is not None:
            ax.axvline(best, ls="--", c="grey", lw=1, label=f"selected {xlabel} ({best})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    bottom = axes[-1, 0]
    bottom.set_xlabel(xlabel)
    # Epochs and rounds are whole numbers: no tick at 1.25 or 1.75.
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig


def _metric_label(series: Mapping[str, Sequence[float]]) -> str:
    """The non-loss panel's y label: "AUC" when that is all it shows."""
    return "AUC" if series and all("auc" in n.lower() for n in series) else "metric"


def plot_curves(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    xlabel: str,
    title: str,
    *,
    x: Sequence[int] | None = None,
    best: int | None = None,
) -> Path:
    """Learning curves (see ``curves_figure``) saved as a PNG at ``path``."""
    return _save(curves_figure(series, xlabel, title, x=x, best=best), path)


def plot_reliability(bins: Sequence[Mapping[str, float]], path: str | Path, title: str) -> Path:
    """Reliability diagram: observed fraction of class 1 against mean predicted probability
    per bin (marker area ~ patients); the diagonal is perfect calibration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfectly calibrated")
    if bins:
        x = [b["mean_predicted"] for b in bins]
        y = [b["observed"] for b in bins]
        n = np.array([b["n"] for b in bins], dtype=float)
        ax.plot(x, y, c="C0", lw=1)
        ax.scatter(x, y, s=20 + 180 * n / n.max(), c="C0", zorder=3, label="bins (area ~ patients)")
    ax.set(
        xlabel="mean predicted probability", ylabel="observed fraction",
        title=title, xlim=(0, 1), ylim=(0, 1.01),
    )
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)
