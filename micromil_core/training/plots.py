"""PNG figures for runs: ROC curves and learning curves (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from micromil_core.io import atomic_path
from micromil_core.training.metrics import binary_roc, roc_auc


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC"
) -> Path | None:
    """One ROC curve per entry ``name -> (y_true (n,), probs (n, C))``; class 1 vs rest."""
    plt = _pyplot()
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


def plot_curves(
    series: Mapping[str, Sequence[float]], path: str | Path, xlabel: str, title: str
) -> Path:
    """Learning curves: one line per named series over epochs/rounds (NaNs skipped)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        v = np.asarray(values, dtype=float)
        x = np.arange(1, len(v) + 1)
        ok = np.isfinite(v)
        if ok.any():
            ax.plot(x[ok], v[ok], marker=".", label=name)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_reliability(bins: Sequence[Mapping[str, float]], path: str | Path, title: str) -> Path:
    """Reliability diagram: observed fraction of class 1 against mean predicted probability
    per bin (marker area ~ patients); the diagonal is perfect calibration."""
    plt = _pyplot()
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
