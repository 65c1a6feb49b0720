"""Stratified k-fold cross-validation on one site (``micromil cv``), resumable fold by fold."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from micromil_core.config import ExperimentConfig
from micromil_core.data.splits import stratified_folds, train_val_split
from micromil_core.io import write_json_atomic
from micromil_core.runtime import seed_everything
from micromil_core.training.fitting import (
    predict_fine,
    prepare_run,
    train_and_select,
    with_fine_to_coarse,
)
from micromil_core.training.loading import load_sites
from micromil_core.training.mechanism import representative_diversity, representative_picks
from micromil_core.training.metrics import (
    METRIC_KEYS,
    classification_metrics,
    fine_metrics,
    summarize_folds,
)
from micromil_core.training.plots import plot_roc
from micromil_core.training.trainer import (
    predict_bags,
)

log = logging.getLogger(__name__)




def cross_validate(
    site_path: str | Path,
    cfg: ExperimentConfig,
    folds: int,
    out: str | Path,
    progress: bool = False,
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
    done = _load_fold_state(state_path, settings)
    n_classes = len(sb.site.classes)
    oof = np.zeros((len(sb.bags), n_classes))
    oof_fine: np.ndarray | None = None  # (n, F) out-of-fold fine probabilities (HMIL)
    for k, test_idx in enumerate(fold_idx):
        if str(k) in done["folds"]:
            oof[test_idx] = np.asarray(done["folds"][str(k)]["probs"])
            stored = done["folds"][str(k)].get("fine_probs")
            oof_fine = _store_fine(oof_fine, len(sb.bags), test_idx, stored)
            continue
        seed_everything(cfg.train.seed + k)
        rest = np.setdiff1d(np.arange(len(sb.bags)), test_idx)
        tr, va = train_val_split(rest, labels, cfg.train.val_fraction, cfg.train.seed + k)
        model, scaler, result = train_and_select(
            with_fine_to_coarse(cfg, [sb.bags[i] for i in tr], sb.site),
            [sb.bags[i] for i in tr],
            [sb.bags[i] for i in va],
            n_classes,
            device,
            progress_label=f"fold {k + 1}/{folds}" if progress else None,
        )
        test = [sb.bags[i] for i in test_idx]
        test = scaler.transform_all(test) if scaler else test
        y, probs = predict_bags(model, test, device)
        oof[test_idx] = probs
        fold_metrics = classification_metrics(y, probs)
        done["folds"][str(k)] = {
            "metrics": fold_metrics,
            # The selection split's figures at the chosen epoch: what a choice between
            # configurations may be made on (the test fold's may not).
            "validation": (
                {m: float(result.val_metrics.get(m, math.nan)) for m in METRIC_KEYS}
                if result.val_metrics
                else None
            ),
            "best_epoch": result.best_epoch,
            "probs": probs.tolist(),
        }
        picks = representative_picks(model, test, device)
        if picks is not None:  # MicroMIL: kept per fold so the summary pools every test bag
            fold_metrics["representative_diversity"] = representative_diversity(picks)
            done["folds"][str(k)]["picks"] = [list(p) for p in picks]
            val = [sb.bags[i] for i in va]
            val_picks = representative_picks(model, scaler.transform_all(val) if scaler else val, device)
            done["folds"][str(k)]["validation_picks"] = [list(p) for p in val_picks or []]
        fine = predict_fine(model, test, device)
        if fine is not None:
            fold_metrics.update(fine_metrics(*fine))
            done["folds"][str(k)]["fine_probs"] = fine[1].tolist()
            oof_fine = _store_fine(oof_fine, len(sb.bags), test_idx, fine[1])
        write_json_atomic(state_path, done)
        log.info(
            "fold %d/%d: auc=%.3f acc=%.3f",
            k + 1,
            folds,
            fold_metrics["auc"],
            fold_metrics["accuracy"],
        )
    per_fold = [done["folds"][str(k)]["metrics"] for k in range(folds)]
    summary: dict[str, Any] = summarize_folds(per_fold)
    summary["pooled_out_of_fold"] = classification_metrics(labels, oof)
    fold_picks = [done["folds"][str(k)].get("picks") for k in range(folds)]
    if all(p is not None for p in fold_picks):
        summary["representative_diversity"] = representative_diversity(
            [tuple(p) for fold in fold_picks for p in fold]
        )
    val_folds = [done["folds"][str(k)].get("validation") for k in range(folds)]
    if all(v for v in val_folds):
        summary["validation"] = summarize_folds(val_folds)
        val_picks = [done["folds"][str(k)].get("validation_picks") for k in range(folds)]
        if all(v for v in val_picks):
            summary["validation"]["representative_diversity"] = representative_diversity(
                [tuple(p) for fold in val_picks for p in fold]
            )
    if oof_fine is not None:
        y_fine = np.array([-1 if b.fine_label is None else b.fine_label for b in sb.bags])
        summary["pooled_out_of_fold"].update(fine_metrics(y_fine, oof_fine))
    summary["per_fold"] = per_fold
    summary["best_epochs"] = [done["folds"][str(k)]["best_epoch"] for k in range(folds)]
    summary["model"] = cfg.model.name
    summary["site"] = sb.site.name
    write_json_atomic(out / "metrics.json", summary)
    plot_roc(
        {f"{cfg.model.name} (out-of-fold)": (labels, oof)},
        out / "roc.png",
        title=f"{folds}-fold CV",
    )
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



def _load_fold_state(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    import json

    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            state = None
        if state and state.get("settings") == json.loads(json.dumps(settings)):
            return state
        if state:
            log.warning("%s holds folds of other settings; starting the CV afresh", path)
    return {"settings": settings, "folds": {}}

