"""The learning-curve figure a person opens after `micromil train` (curves.png)."""

import math

from micromil_core.training.plots import curves_figure, plot_curves

SERIES = {
    "train loss": [0.70, 0.61, 0.52, 0.47],
    "val loss": [0.68, 0.62, 0.60, 0.61],
    "val AUC": [0.60, 0.70, 0.75, 0.74],
}


def _ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_loss_and_auc_in_labelled_panels_with_whole_epoch_ticks():
    fig = curves_figure(SERIES, "epoch", "micromil: training", best=3)
    fig.canvas.draw()  # ticks are placed at draw time
    loss_ax, auc_ax = fig.axes
    assert fig.get_suptitle() == "micromil: training"
    assert loss_ax.get_ylabel() == "loss" and auc_ax.get_ylabel() == "AUC"
    assert auc_ax.get_xlabel() == "epoch"
    assert {ln.get_label() for ln in loss_ax.get_lines()} >= {"train loss", "val loss"}
    assert "val AUC" in {ln.get_label() for ln in auc_ax.get_lines()}
    for ax in fig.axes:
        ticks = _ticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        # The selected epoch is marked in every panel, and named in its legend.
        marks = [ln for ln in ax.get_lines() if ln.get_label() == "selected epoch (3)"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [3, 3]
        assert "selected epoch (3)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_two_epochs_still_whole_ticks_and_epoch_numbers_follow_x(tmp_path):
    fig = curves_figure({k: v[:2] for k, v in SERIES.items()}, "epoch", "t", x=[6, 7])
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in _ticks(fig.axes[-1]))
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [6, 7]
    path = plot_curves(SERIES, tmp_path / "curves.png", xlabel="epoch", title="t", best=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_validation_has_one_loss_panel():
    fig = curves_figure(
        {"train loss": [0.7, 0.6], "val loss": [math.nan] * 2, "val AUC": [math.nan] * 2},
        "epoch", "t",
    )
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "loss"
