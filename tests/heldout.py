"""Held-out metrics recomputed by a test from what a run leaves behind: the saved global
model (model.pt) and the held-out hospital's own folder. A federation never sends
per-patient predictions to the coordinator, so the test scores those patients itself and
compares the metrics the run reported with metrics computed here by their definitions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from micromil_core.training.fitting import predict_fine
from micromil_core.training.score import load_checkpoint_and_sites


def pairwise_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC by its definition (Hanley & McNeil 1982): the chance that a patient of class c
    gets a higher P(c) than a patient of another class, ties counting half; class 1 for
    two classes, else the mean over classes (one-vs-rest, macro).

    Shapes: ``y`` (n,) class indices, ``probs`` (n, C).
    """
    y, probs = np.asarray(y), np.asarray(probs, dtype=float)
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    aucs = []
    for c in classes:
        pos, neg = probs[y == c, c], probs[y != c, c]
        above = (pos[:, None] > neg[None, :]).mean()  # (P, N) pairs
        ties = (pos[:, None] == neg[None, :]).mean()
        aucs.append(above + 0.5 * ties)
    return float(np.mean(aucs))


@dataclass(frozen=True)
class Scored:
    """One site's patients under a checkpoint: labels (n,), probabilities (n, C) and, for a
    hierarchical model, fine labels (n,) (-1 unknown) and fine probabilities (n, F)."""

    y: np.ndarray
    probs: np.ndarray
    y_fine: np.ndarray | None = None
    fine_probs: np.ndarray | None = None


def score_site(model: Path, site: Path) -> Scored:
    """Every patient of ``site`` under the checkpoint ``model``, scored in this process on
    one thread, as the site scores them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = load_checkpoint_and_sites(model, [site], "cpu", None, False, True)
        (sb,) = run.sites
        scaled = run.model_inputs(sb, sb.bags)
        fine = predict_fine(run.model, scaled, run.device)
        return Scored(*run.predict(scaled), *(fine or (None, None)))
    finally:
        torch.set_num_threads(threads)


def assert_matches_held_out(metrics: dict, model: Path, site: Path) -> None:
    """The run's held-out ``metrics`` (one held-out site) are those of the model it saved on
    that site's patients: count, AUC and argmax accuracy, recomputed here."""
    scored = score_site(model, site)
    y, probs = scored.y, scored.probs
    assert metrics["n"] == len(y)
    assert len(np.unique(y)) > 1, "a held-out site with one class has no AUC to check"
    assert metrics["auc"] == pytest.approx(pairwise_auc(y, probs), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(float((probs.argmax(axis=1) == y).mean()), abs=1e-9)

