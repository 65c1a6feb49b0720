"""Training one model on the pooled patients of sites: ``micromil train`` and the helpers
the federation and cross-validation share (fresh fit, data-dependent init, HMIL fine labels)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.config import ExperimentConfig
from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.scaler import FeatureScaler, scale_bags
from micromil_core.data.site import SiteData
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.io import write_json_atomic
from micromil_core.models.registry import build_model, params_from_dict
from micromil_core.runtime import resolve_device, seed_everything, set_threads
from micromil_core.tracking import check_installed, log_training
from micromil_core.training.checkpoint import Checkpoint, save_checkpoint
from micromil_core.training.loading import load_sites, split_train_val_test
from micromil_core.training.metrics import (
    fine_metrics,
)
from micromil_core.training.plots import plot_curves, plot_roc
from micromil_core.training.trainer import (
    EpochLog,
    TrainResult,
    fit,
    iter_batches,
    metrics_from_predictions,
    predict_bags,
)

log = logging.getLogger(__name__)




def prepare_run(cfg: ExperimentConfig) -> torch.device:
    set_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    return resolve_device(cfg.train.device)



def _progress_printer(label: str, enabled: bool):
    """A tqdm bar over epochs when enabled (CLI), else None."""
    if not enabled:
        return None, None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return None, None
    bar = tqdm(desc=label, unit="epoch", leave=False)

    def update(entry: EpochLog) -> None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{entry.train_loss:.3f}",
            val_loss=f"{entry.val_loss:.3f}",
            val_auc=f"{entry.val_metrics.get('auc', math.nan):.3f}",
        )

    return update, bar



def with_fine_to_coarse(
    cfg: ExperimentConfig, train_bags: Sequence[Bag], site: SiteData
) -> ExperimentConfig:
    """``cfg`` with ``model.params.fine_to_coarse`` derived from the TRAINING patients.

    Only for a model that takes the param (HMIL) when the config leaves it empty and the
    site has fine labels; the derived map then lands in the model's params and so in the
    checkpoint. Each fine label must co-occur with exactly one coarse label.

    Raises:
        ConfigError: a fine label occurs with two coarse labels, or has no training patient.
    """
    params = params_from_dict(cfg.model.name, cfg.model.params)
    if getattr(params, "fine_to_coarse", None) != () or not site.fine_classes:
        return cfg
    seen: dict[int, set[int]] = {}
    for bag in train_bags:
        if bag.fine_label is not None:
            seen.setdefault(bag.fine_label, set()).add(bag.label)
    if not seen:
        log.warning(
            "no training patient has a fine_label: %s learns no fine classes", cfg.model.name
        )
        return cfg
    fix = (
        f"set model.params.fine_to_coarse (the coarse class index of each fine class, in the "
        f"order {list(site.fine_classes)}; coarse classes {list(site.classes)})"
    )
    mapping = []
    for f, name in enumerate(site.fine_classes):
        coarse = sorted(seen.get(f, ()))
        if not coarse:
            raise ConfigError(
                f"fine label {name!r} has no training patient, so its coarse label is unknown; "
                f"add patients or {fix}"
            )
        if len(coarse) > 1:
            a, b = (site.classes[c] for c in coarse[:2])
            raise ConfigError(
                f"fine label {name!r} occurs with coarse labels {a!r} and {b!r} among the "
                f"training patients; a fine label must belong to exactly one coarse label: fix "
                f"patients.csv or {fix}"
            )
        mapping.append(coarse[0])
    params_dict = {**cfg.model.params, "fine_to_coarse": mapping}
    return replace(cfg, model=replace(cfg.model, params=params_dict))



@torch.no_grad()
def predict_fine(
    model: Any,
    bags: list[Bag],
    device: torch.device,
    batch_size: int = 1,
    labelled_only: bool = True,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Fine labels (n,) (-1 unknown) and fine probabilities (n, F) of a hierarchical model.

    None when the model gives no ``extras["fine_probs"]``, or (``labelled_only``, the
    default, for metrics) when no bag has a fine label.
    """
    y_fine = np.array([-1 if b.fine_label is None else b.fine_label for b in bags], dtype=int)
    if not bags or (labelled_only and (y_fine < 0).all()):
        return None
    model.eval()
    probs = []
    for batch in iter_batches(bags, batch_size):
        extras = model.predict_batch(batch.to(device)).extras
        if "fine_probs" not in extras:
            return None
        probs.append(extras["fine_probs"].float().cpu())
    return y_fine, torch.cat(probs).numpy()



def fine_metrics_of(model: Any, bags: list[Bag], device: torch.device) -> dict[str, float]:
    """``fine_*`` metrics of ``model`` on ``bags`` (empty when there are none)."""
    fine = predict_fine(model, bags, device)
    return fine_metrics(*fine) if fine is not None else {}



def train_and_select(
    cfg: ExperimentConfig,
    train_bags: list[Bag],
    val_bags: list[Bag],
    n_classes: int,
    device: torch.device,
    progress_label: str | None = None,
) -> tuple[Any, FeatureScaler | None, TrainResult]:
    """Fit the scaler on training bags, build and train the model; returns the best model."""
    if not train_bags:
        raise SiteDataError("no training patients after splitting; add patients or splits")
    model, scaler, result = _fit_fresh(cfg, train_bags, val_bags, n_classes, device, progress_label)
    if cfg.train.refit and val_bags:
        # Same seed, same initialisation; all patients; the epoch count chosen above.
        seed_everything(cfg.train.seed)
        model, scaler, _ = _fit_fresh(
            cfg, train_bags + val_bags, [], n_classes, device, progress_label, result.best_epoch
        )
    return model, scaler, result



def _fit_fresh(
    cfg: ExperimentConfig,
    train_bags: list[Bag],
    val_bags: list[Bag],
    n_classes: int,
    device: torch.device,
    progress_label: str | None,
    epochs: int | None = None,
) -> tuple[Any, FeatureScaler | None, TrainResult]:
    scaler = FeatureScaler.fit(train_bags) if cfg.train.standardize else None
    train_bags, val_bags = scale_bags(train_bags, scaler), scale_bags(val_bags, scaler)
    in_dim = int(train_bags[0].features.shape[1])
    model = build_model(cfg.model.name, in_dim, n_classes, dict(cfg.model.params))
    if cfg.train.refit and model.needs_baseline_stage:
        # Refused before the first training rather than after it (fit refuses it too).
        raise ConfigError(
            f"model {cfg.model.name!r} trains in two stages (a converged baseline first), so "
            "train.refit cannot replay its epoch count; set train.refit=false, or "
            "model.params.teacher_init=warmup"
        )
    init_model_from_bags(model, train_bags, cfg.train.seed)
    update, bar = _progress_printer(progress_label or "train", progress_label is not None)
    try:
        result = fit(
            model,
            train_bags,
            val_bags,
            cfg.train,
            device,
            progress=update,
            epochs=epochs,
            # A refit replays the first ``epochs`` of a cfg.train.epochs run: the same part of
            # the schedules' progress, not all of it squeezed into fewer epochs.
            progress_span=(0.0, min(1.0, epochs / cfg.train.epochs)) if epochs else (0.0, 1.0),
            baseline_stage=True,
        )
    finally:
        if bar is not None:
            bar.close()
    return model, scaler, result



INIT_MAX_INSTANCES = 20_000  # enough to seed K centroids; bounds memory on huge bags



def init_model_from_bags(model: Any, bags: list[Bag], seed: int) -> None:
    """Call the model's data-dependent init on a seeded sample of training bags."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(bags), generator=gen).tolist()
    sample, total = [], 0
    for i in order:
        if sample and total + bags[i].num_instances > INIT_MAX_INSTANCES:
            break
        sample.append(bags[i])
        total += bags[i].num_instances
    batch = collate_bags(sample)
    device = next(model.parameters()).device
    model.init_from_data(batch.x.to(device), batch.mask.to(device), generator=gen)



def _history_rows(result: TrainResult) -> list[dict[str, Any]]:
    return [
        {
            "epoch": e.epoch,
            "train_loss": e.train_loss,
            "val_loss": e.val_loss,
            "val_auc": e.val_metrics.get("auc", math.nan),
            "seconds": e.seconds,
        }
        for e in result.history
    ]



def train_pooled(
    site_paths: Sequence[str | Path],
    cfg: ExperimentConfig,
    out: str | Path,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one model on the pooled train/val patients of several sites.

    Writes OUT/model.pt, OUT/metrics.json (validation, and the sites' test splits when
    present -- reported, never used for selection), OUT/history.json, OUT/curves.png and
    OUT/roc.png (validation and test patients).
    """
    out = Path(out)
    check_installed(cfg.tracking)
    device = prepare_run(cfg)
    sites = load_sites(site_paths, cfg.data, device, progress=progress)
    train, val, test = [], [], []
    for sb in sites:
        tr, va, te = split_train_val_test(sb, cfg.train)
        train += tr
        val += va
        test += te
    classes = list(sites[0].site.classes)
    cfg = with_fine_to_coarse(cfg, train, sites[0].site)
    model, scaler, result = train_and_select(
        cfg, train, val, len(classes), device, progress_label="train" if progress else None
    )
    validation = dict(result.val_metrics)
    roc_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if val and not cfg.train.refit:  # a refit model was not the one validated
        scaled_val = scale_bags(val, scaler)
        validation.update(fine_metrics_of(model, scaled_val, device))
        roc_curves["validation"] = predict_bags(model, scaled_val, device)
    metrics: dict[str, Any] = {
        "validation": validation,
        "best_epoch": result.best_epoch,
        "n_train": len(train),
        "n_val": len(val),
    }
    if test:
        scaled_test = scale_bags(test, scaler)
        roc_curves["test"] = predict_bags(model, scaled_test, device)
        metrics["test"] = metrics_from_predictions(*roc_curves["test"])
        metrics["test"].update(fine_metrics_of(model, scaled_test, device))
    ckpt = Checkpoint(
        model_name=cfg.model.name,
        in_dim=int(train[0].features.shape[1]),
        n_classes=len(classes),
        params=dict(model_params(model, cfg)),
        classes=classes,
        state_dict=model.state_dict(),
        scaler=scaler,
        encoder=cfg.data.encoder,
        fine_classes=list(sites[0].site.fine_classes) if sites[0].site.fine_classes else None,
        config=cfg.to_dict(),
        provenance={
            "trained_on": [sb.site.name for sb in sites],
            "best_epoch": result.best_epoch,
            "validation": result.val_metrics,
            "encoder_identity": _encoder_identity(sites),
        },
    )
    save_checkpoint(ckpt, out / "model.pt")
    _write_run_files(out, cfg, result, metrics, roc_curves)
    return metrics


def _encoder_identity(sites) -> str | None:
    """The encoder behind the training features (``identity_label``: cache id + weights
    SHA-256), None for precomputed features."""
    from micromil_core.encoders.base import identity_label
    from micromil_core.encoders.extract import read_encoder_identity

    identity = read_encoder_identity(sites[0].feature_dir)
    return identity_label(identity) if identity else None


def _write_run_files(
    out: Path, cfg: ExperimentConfig, result: TrainResult, metrics: dict[str, Any],
    roc_curves: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    """history.json, metrics.json, curves.png, roc.png beside model.pt (and the tracker's copy)."""
    history = _history_rows(result)
    write_json_atomic(out / "history.json", history)
    write_json_atomic(out / "metrics.json", metrics)
    plot_curves(
        {
            "train loss": [h["train_loss"] for h in history],
            "val loss": [h["val_loss"] for h in history],
            "val AUC": [h["val_auc"] for h in history],
        },
        out / "curves.png",
        xlabel="epoch",
        title=f"{cfg.model.name}: training",
        x=[h["epoch"] for h in history],
        best=result.best_epoch,  # the model that was kept (train.select_on)
    )
    if roc_curves:  # none when a refit run has no test split: nothing left unseen to plot
        plot_roc(roc_curves, out / "roc.png", title=f"{cfg.model.name}: trained model")
    log_training(cfg, out, history, metrics)  # no-op unless tracking.backend is set



def model_params(model: Any, cfg: ExperimentConfig) -> dict[str, Any]:
    """The full params of a built model (defaults filled in) for the checkpoint."""
    from micromil_core.models.registry import params_to_dict

    params = getattr(model, "params", None)
    return params_to_dict(params) if params is not None else dict(cfg.model.params)

