"""Stratified k-fold cross-validation on one site (``micromil cv``), resumable fold by fold."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.config import ExperimentConfig
from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.scaler import scale_bags
from micromil_core.data.splits import stratified_folds, train_val_split
from micromil_core.errors import ConfigError
from micromil_core.io import strict_json, write_json_atomic
from micromil_core.runtime import seed_everything
from micromil_core.training.fitting import (
    prepare_run,
    train_and_select,
    with_fine_to_coarse,
)
from micromil_core.training.loading import SiteBags, load_sites
from micromil_core.training.mechanism import (
    Picks,
    prediction_picks,
    representative_diversity,
    representative_picks,
)
from micromil_core.training.metrics import (
    METRIC_KEYS,
    classification_metrics,
    fine_metrics,
    summarize_folds,
)
from micromil_core.training.plots import plot_roc

log = logging.getLogger(__name__)


def cross_validate(
    site_path: str | Path,
    cfg: ExperimentConfig,
    folds: int,
    out: str | Path,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Stratified k-fold CV on all patients of one site.

    Folds depend only on ``train.seed`` and the labels, so every model sees the same folds.
    In each fold a stratified validation set is carved from the training part for
    selection and early stopping; the test fold is touched once, after selection.
    Completed folds are kept in OUT/folds.json and skipped when the command is re-run with
    the same settings.
    """
    out = Path(out)
    device = prepare_run(cfg)
    (sb,) = load_sites([site_path], cfg.data, device, progress=progress)
    labels = np.array([b.label for b in sb.bags])
    fold_idx = stratified_folds(labels, folds, cfg.train.seed)
    state_path = out / "folds.json"
    settings = {"config": cfg.to_dict(), "folds": folds, "site": str(Path(site_path).resolve())}
    done = _load_fold_state(state_path, settings, overwrite)
    oof = np.zeros((len(sb.bags), len(sb.site.classes)))
    oof_fine: np.ndarray | None = None  # (n, F) out-of-fold fine probabilities (HMIL)
    for k, test_idx in enumerate(fold_idx):
        if str(k) not in done["folds"]:
            label = f"fold {k + 1}/{folds}" if progress else None
            done["folds"][str(k)] = _run_fold(sb, labels, test_idx, cfg, k, device, label)
            write_json_atomic(state_path, done)
            fold_metrics = done["folds"][str(k)]["metrics"]
            log.info(
                "fold %d/%d: auc=%.3f acc=%.3f",
                k + 1,
                folds,
                fold_metrics["auc"],
                fold_metrics["accuracy"],
            )
        # Fresh and resumed folds alike: float32 outputs survive the JSON lists exactly.
        oof[test_idx] = np.asarray(done["folds"][str(k)]["probs"])
        stored = done["folds"][str(k)].get("fine_probs")
        oof_fine = _store_fine(oof_fine, len(sb.bags), test_idx, stored)
    summary = _summarize(done, folds, sb, labels, oof, oof_fine)
    summary["model"] = cfg.model.name
    summary["site"] = sb.site.name
    write_json_atomic(out / "metrics.json", summary)
    plot_roc(
        {f"{cfg.model.name} (out-of-fold)": (labels, oof)},
        out / "roc.png",
        title=f"{folds}-fold CV",
    )
    return summary


def _run_fold(
    sb: SiteBags,
    labels: np.ndarray,
    test_idx: np.ndarray,
    cfg: ExperimentConfig,
    k: int,
    device: torch.device,
    progress_label: str | None,
) -> dict[str, Any]:
    """Train fold ``k`` on the rest of the site, select on its validation part, then score
    its test bags once; returns the fold's entry of folds.json."""
    seed_everything(cfg.train.seed + k)
    rest = np.setdiff1d(np.arange(len(sb.bags)), test_idx)
    tr, va = train_val_split(rest, labels, cfg.train.val_fraction, cfg.train.seed + k)
    train = [sb.bags[i] for i in tr]
    model, scaler, result = train_and_select(
        with_fine_to_coarse(cfg, train, sb.site),
        train,
        [sb.bags[i] for i in va],
        len(sb.site.classes),
        device,
        progress_label=progress_label,
    )

    def model_inputs(idx: np.ndarray) -> list[Bag]:
        bags = [sb.bags[i] for i in idx]
        return scale_bags(bags, scaler)

    test = _predict_fold(model, model_inputs(test_idx), device)
    fold_metrics = classification_metrics(test.y, test.probs)
    entry: dict[str, Any] = {
        "metrics": fold_metrics,
        # The selection split's figures at the chosen epoch: what a choice between
        # configurations may be made on (the test fold's may not).
        "validation": (
            {m: float(result.val_metrics.get(m, math.nan)) for m in METRIC_KEYS}
            if result.val_metrics
            else None
        ),
        "best_epoch": result.best_epoch,
        "probs": test.probs.tolist(),
    }
    if test.picks is not None:  # MicroMIL: kept per fold so the summary pools every test bag
        fold_metrics["representative_diversity"] = representative_diversity(test.picks)
        entry["picks"] = [list(p) for p in test.picks]
        val_picks = representative_picks(model, model_inputs(va), device)
        entry["validation_picks"] = [list(p) for p in val_picks or []]
    if test.fine is not None:
        fold_metrics.update(fine_metrics(*test.fine))
        entry["fine_probs"] = test.fine[1].tolist()
    return entry


@dataclass
class _FoldPredictions:
    """A test fold's outputs from one forward pass per bag.

    Shapes: y (n,), probs (n, C); picks one ``Picks`` per bag or None (no representatives);
    fine (labels (n,) -1 unknown, probabilities (n, F)) or None (no fine outputs or labels)
    """

    y: np.ndarray
    probs: np.ndarray
    picks: list[Picks] | None
    fine: tuple[np.ndarray, np.ndarray] | None


def _predict_fold(model: Any, bags: list[Bag], device: torch.device) -> _FoldPredictions:
    """``predict_bags``, ``representative_picks`` and ``predict_fine`` in one pass.

    Evaluation is deterministic (eval mode draws no random numbers), so one forward pass
    per bag gives what the three separate passes gave. One bag per pass, as there: no
    padded instance can be picked.
    """
    model.eval()
    y_fine = np.array([-1 if b.fine_label is None else b.fine_label for b in bags], dtype=int)
    probs, fine = [], []
    picks: list[Picks] | None = []
    has_fine = bool((y_fine >= 0).any())  # fine metrics need at least one fine label
    for bag in bags:
        pred = model.predict_batch(collate_bags([bag]).to(device))
        extras = pred.extras or {}
        probs.append(pred.probs.float().cpu())
        bag_pick = prediction_picks(pred, bag.num_instances) if picks is not None else None
        if bag_pick is None:
            picks = None
        else:
            picks.append(bag_pick)
        if has_fine and "fine_probs" in extras:
            fine.append(extras["fine_probs"].float().cpu())
        else:
            has_fine = False
    y = np.array([b.label for b in bags], dtype=int)
    return _FoldPredictions(
        y,
        torch.cat(probs).numpy() if probs else np.zeros((0, model.n_classes)),
        picks,
        (y_fine, torch.cat(fine).numpy()) if has_fine else None,
    )


def _summarize(
    done: dict[str, Any],
    folds: int,
    sb: SiteBags,
    labels: np.ndarray,
    oof: np.ndarray,
    oof_fine: np.ndarray | None,
) -> dict[str, Any]:
    """metrics.json's figures: fold means and spreads, out-of-fold pooled metrics, and the
    representative diversity pooled over every test (and validation) bag."""
    fold = [done["folds"][str(k)] for k in range(folds)]
    per_fold = [f["metrics"] for f in fold]
    summary: dict[str, Any] = summarize_folds(per_fold)
    summary["pooled_out_of_fold"] = classification_metrics(labels, oof)
    fold_picks = [f.get("picks") for f in fold]
    if all(p is not None for p in fold_picks):
        summary["representative_diversity"] = representative_diversity(
            [tuple(p) for picks in fold_picks for p in picks]
        )
    val_folds = [f.get("validation") for f in fold]
    if all(v for v in val_folds):
        summary["validation"] = summarize_folds(val_folds)
        val_picks = [f.get("validation_picks") for f in fold]
        if all(v for v in val_picks):
            summary["validation"]["representative_diversity"] = representative_diversity(
                [tuple(p) for picks in val_picks for p in picks]
            )
    if oof_fine is not None:
        y_fine = np.array([-1 if b.fine_label is None else b.fine_label for b in sb.bags])
        summary["pooled_out_of_fold"].update(fine_metrics(y_fine, oof_fine))
    summary["per_fold"] = per_fold
    summary["best_epochs"] = [f["best_epoch"] for f in fold]
    return summary


def _store_fine(
    oof_fine: np.ndarray | None, n: int, test_idx: np.ndarray, probs: Any
) -> np.ndarray | None:
    """Put one fold's fine probabilities (n_test, F) into the (n, F) out-of-fold array."""
    if probs is None:
        return oof_fine
    probs = np.asarray(probs)
    if oof_fine is None:
        oof_fine = np.zeros((n, probs.shape[1]))
    oof_fine[test_idx] = probs
    return oof_fine


def _load_fold_state(path: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The folds finished by an earlier run with the same settings; another run's folds
    are kept unless ``overwrite``."""
    import json

    if path.is_file() and not overwrite:
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            state = None
        # Compared as written: strict JSON (tuples as lists, NaN as null).
        if state and state.get("settings") == json.loads(json.dumps(strict_json(settings))):
            return state
        if state:
            raise ConfigError(
                f"{path.parent} holds a CV run with other settings; pass --overwrite to replace "
                "it, or choose a new --out (the same settings resume it)"
            )
    return {"settings": settings, "folds": {}}
