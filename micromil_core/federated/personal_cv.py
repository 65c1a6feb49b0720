"""How long a hospital fine-tunes the global model, chosen by cross-validation at the site.

A site's validation split is small: in the Fashion benchmark federation the training sites'
splits hold 3-15 patients of the smaller class, and a choice made on them mostly kept the
global model even where the site's own model was far better on its test patients. Here the
choice rests on every patient the site may train on (its training and validation patients,
never its test patients): in each of k stratified folds the global model is fine-tuned on
the other folds and scored on the held fold after every epoch; the epoch count with the best
mean score over the folds wins, epoch 0 (the global model itself) included; by default
(``federation.personal_rule: one-se``) the fewest epochs within one standard error of that
best, so a site keeps the global model unless fine-tuning beats it by more than the folds'
noise (a held fold holds a few patients of a class, and the best mean of 21 epoch counts
is an optimistic one; docs/personalisation.md compares the rules). The personal model is then the
global model fine-tuned for that many epochs on all those patients (as ``train.refit`` does
for a local model).

The global model itself was trained, through the rounds, on the training patients that now
sit in the held folds; only the validation patients are new to it. Its held-fold scores are
therefore somewhat optimistic, and the choice leans towards keeping it: a conservative bias
for a hospital, which should change models only for a clear gain.

It costs k + 1 fine-tunings at the site instead of one; ``federation.personal_folds: 0``
chooses on the validation split instead. Not used under DP-SGD (each fold would spend
privacy on the same patients again) nor for ``local-head`` (its head, kept from the rounds,
has already seen every training patient).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from micromil_core.config import TrainConfig
from micromil_core.data.bag import Bag
from micromil_core.data.splits import stratified_folds
from micromil_core.models.base import MILModel
from micromil_core.runtime import seed_everything

log = logging.getLogger(__name__)


@dataclass
class CvChoice:
    """The chosen epoch count (0: keep the global model), the folds used, the mean held-fold
    AUC of the global model and of the fold models at the chosen count (not of the model
    refitted on all patients, and optimistic: the best of ``epochs + 1`` candidates), and
    the personal model (None at 0)."""

    epoch: int
    folds: int
    auc_global: float
    auc_personal: float
    model: MILModel | None


def score_on(cfg: TrainConfig, model: MILModel, train: list[Bag], val: list[Bag],
             device: torch.device) -> tuple[float, dict]:
    """The validation score ``fit`` selects by (with its class weights, from ``train``) and
    the metrics; -inf without validation patients."""
    from micromil_core.training.trainer import class_weights, evaluate_bags, selection_score

    if not val:
        return -math.inf, {}
    cw = class_weights([b.label for b in train], model.n_classes) if cfg.class_weighting else None
    metrics = evaluate_bags(model, val, device, class_weight=cw)
    return selection_score(cfg, metrics), metrics


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def usable_folds(labels: list[int], wanted: int) -> int:
    """Folds that keep every class in every held fold: at most the smallest class's count;
    below 2 there is no cross-validation (``wanted`` 0 asks for none)."""
    if wanted < 2:
        return 0
    counts = np.bincount(np.asarray(labels, dtype=int))
    present = counts[counts > 0]
    k = min(wanted, int(present.min())) if len(present) >= 2 else 0
    return k if k >= 2 else 0


def mean_fold_scores(scores: np.ndarray) -> np.ndarray:
    """Each epoch count's mean held-fold score, -inf where some fold's is not finite."""
    return np.where(np.isfinite(scores).all(axis=0), scores.mean(axis=0), -np.inf)


def chosen_epoch(scores: np.ndarray, rule: str = "one-se") -> int:
    """The epoch count that wins, from the (folds, epochs + 1) held-fold scores (column 0:
    the global model). An epoch whose score is not finite in some fold (a diverged
    fine-tuning) never wins. ``best``: the best mean, the fewest epochs on ties. ``one-se``:
    the fewest epochs whose mean is within one standard error of the best's, the error of
    the paired per-fold difference, so a site keeps the global model (or stops earlier)
    unless fine-tuning (longer) beats it by more than the folds' noise."""
    mean = mean_fold_scores(scores)
    best = int(np.argmax(mean))
    if rule == "best" or scores.shape[0] < 2:
        return best
    for e in range(best):
        if not np.isfinite(mean[e]):
            continue
        gain = scores[:, best] - scores[:, e]
        if gain.mean() <= gain.std(ddof=1) / math.sqrt(len(gain)):
            return e
    return best


def cv_fine_tuning(
    build: Callable[[], MILModel], pool: list[Bag], cfg: TrainConfig, epochs: int, folds: int,
    device: torch.device, span: tuple[float, float],
    extra_loss: Callable[[MILModel], Callable | None] = lambda m: None, rule: str = "one-se",
) -> CvChoice:
    """Choose the fine-tuning epoch count (0..``epochs``) by ``folds``-fold CV over ``pool``
    under ``rule`` (``chosen_epoch``) and fine-tune on all of ``pool`` for it. ``build``
    makes a fresh copy of the global model; ``extra_loss(model)`` its extra loss term (the
    proximal one), if any."""
    from micromil_core.training.trainer import fit, selection_score

    labels = [b.label for b in pool]
    no_stopping = replace(cfg, patience=0)  # every fold's curve runs to ``epochs``
    scores = np.full((folds, epochs + 1), np.nan)
    aucs = np.full((folds, epochs + 1), np.nan)
    for i, held_idx in enumerate(stratified_folds(labels, folds, cfg.seed)):
        inside = set(held_idx.tolist())
        held = [pool[j] for j in held_idx]
        rest = [b for j, b in enumerate(pool) if j not in inside]
        model = build().to(device)
        scores[i, 0], first = score_on(cfg, model, rest, held, device)
        aucs[i, 0] = first.get("auc", np.nan)
        seed_everything(cfg.seed + i)
        result = fit(model, rest, held, no_stopping, device, extra_loss=extra_loss(model),
                     epochs=epochs, progress_span=span)
        for e, entry in enumerate(result.history, start=1):
            scores[i, e] = selection_score(cfg, entry.val_metrics)
            aucs[i, e] = entry.val_metrics.get("auc", np.nan)
    mean = mean_fold_scores(scores)
    best = chosen_epoch(scores, rule)
    auc = [_finite_mean(aucs[:, e]) for e in range(epochs + 1)]
    log.info("personal fine-tuning by %d-fold CV over %d patients: mean score by epoch %s; chose "
             "%d (rule %s)", folds, len(pool), np.round(mean, 4).tolist(), best, rule)
    if best == 0:
        return CvChoice(0, folds, float(auc[0]), float(auc[0]), None)
    model = build().to(device)
    seed_everything(cfg.seed)
    # The first ``best`` epochs of the folds' runs: the same part of the span, so the model's
    # schedules (HMIL's curriculum, MRAN's ramp) see the progress the chosen epochs saw.
    first, last = span
    fit(model, pool, [], cfg, device, extra_loss=extra_loss(model), epochs=best,
        progress_span=(first, first + (last - first) * best / epochs))
    return CvChoice(best, folds, float(auc[0]), float(auc[best]), model)
