"""Local training of one MIL model on a list of bags, with validation-based selection.

The test split never enters this module: model selection and early stopping use the
validation bags only (the released MicroMIL code selected on the test set; we do not).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from micromil_core.config import TrainConfig
from micromil_core.data.bag import Bag, BagBatch, collate_bags
from micromil_core.errors import ConfigError, TrainingError
from micromil_core.models.base import MILModel
from micromil_core.training.metrics import classification_metrics

log = logging.getLogger(__name__)

# Extra loss on the model's parameters (e.g. FedProx's proximal term), added every step.
ExtraLoss = Callable[[MILModel], Tensor]


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_metrics: dict[str, float]
    seconds: float


@dataclass
class TrainResult:
    best_epoch: int
    val_metrics: dict[str, float]
    history: list[EpochLog] = field(default_factory=list)
    stopped_early: bool = False


def class_weights(labels: list[int], n_classes: int) -> Tensor:
    """Inverse-frequency weights, mean 1 over the classes present (absent classes: 1)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes).astype(float)
    present = max(int((counts > 0).sum()), 1)
    weights = np.where(counts > 0, counts.sum() / (present * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def build_optimizer(
    params, name: str, lr: float, weight_decay: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """``train.optimizer``: Adam, or SGD with (heavy-ball) momentum.

    Fused (one kernel over all parameters) where torch has it for the parameters' device:
    the same update up to rounding, and Adam's step over MicroMIL's 1.2 M parameters takes
    ~1 ms instead of ~6 on CPU (the per-tensor loop is torch's CPU default)."""
    params = list(params)
    fused = {"fused": True} if _fusable(params) else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)


def _fusable(params: list) -> bool:
    """Whether torch's fused optimizers take ``params`` (plain tensors or param groups):
    floating point, all on one CPU or CUDA device."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    devices = {t.device for t in tensors}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(t.is_floating_point() for t in tensors)
    )


def iter_batches(
    bags: list[Bag], batch_size: int, generator: torch.Generator | None = None
) -> Iterator[BagBatch]:
    """Batches in a shuffled order (when ``generator`` is given) or in the given order."""
    order = (
        torch.randperm(len(bags), generator=generator).tolist()
        if generator is not None
        else list(range(len(bags)))
    )
    for start in range(0, len(order), batch_size):
        yield collate_bags([bags[i] for i in order[start : start + batch_size]])


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (no grad scaler needed); a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_one_epoch(
    model: MILModel,
    bags: list[Bag],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    class_weight: Tensor | None = None,
    extra_loss: ExtraLoss | None = None,
) -> float:
    """One pass over ``bags``; returns the mean training loss per bag."""
    model.train()
    total, count = 0.0, 0
    weight = class_weight.to(device) if class_weight is not None else None
    for batch in iter_batches(bags, cfg.batch_size, generator):
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(device, cfg.amp):
            loss, _ = model.loss_batch(batch, class_weight=weight)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"training loss became {float(loss)}; lower train.lr or set train.grad_clip"
            )
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        model.after_step()
        total += float(loss.detach()) * len(batch)
        count += len(batch)
    return total / max(count, 1)


@torch.no_grad()
def predict_bags(
    model: MILModel, bags: list[Bag], device: torch.device, batch_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic predictions: labels (n,) and probabilities (n, C), in ``bags`` order."""
    model.eval()
    probs = []
    for batch in iter_batches(bags, batch_size):
        batch = batch.to(device)
        probs.append(model.predict_batch(batch).probs.float().cpu())
    y = np.array([b.label for b in bags], dtype=int)
    return y, torch.cat(probs).numpy() if probs else np.zeros((0, model.n_classes))


def evaluate_bags(
    model: MILModel,
    bags: list[Bag],
    device: torch.device,
    batch_size: int = 1,
    class_weight: Tensor | None = None,
) -> dict[str, float]:
    """Core metrics plus mean cross-entropy ``loss`` on ``bags``."""
    y, probs = predict_bags(model, bags, device, batch_size)
    return metrics_from_predictions(y, probs, class_weight)


def metrics_from_predictions(
    y: np.ndarray, probs: np.ndarray, class_weight: Tensor | None = None
) -> dict[str, float]:
    """Core metrics plus the (class-weighted) cross-entropy ``loss``."""
    metrics = classification_metrics(y, probs)
    log_p = torch.from_numpy(probs).float().clamp_min(1e-7).log()
    metrics["loss"] = float(F.nll_loss(log_p, torch.from_numpy(y), weight=class_weight))
    return metrics


def _improved(cfg: TrainConfig, metrics: dict[str, float], best: float) -> tuple[bool, float]:
    """Selection score (higher is better) and whether it beats ``best``."""
    if cfg.select_on == "auc" and math.isfinite(metrics["auc"]):
        score = metrics["auc"] - 1e-3 * metrics["loss"]  # loss breaks AUC ties
    else:
        score = -metrics["loss"]
    return score > best, score


def selection_score(cfg: TrainConfig, metrics: dict[str, float]) -> float:
    """The validation score model selection maximises (``train.select_on``)."""
    return _improved(cfg, metrics, -math.inf)[1]


def fit(
    model: MILModel,
    train_bags: list[Bag],
    val_bags: list[Bag],
    cfg: TrainConfig,
    device: torch.device,
    progress: Callable[[EpochLog], None] | None = None,
    extra_loss: ExtraLoss | None = None,
    epochs: int | None = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
    baseline_stage: bool = False,
) -> TrainResult:
    """Train with ``cfg.optimizer``; keep the weights of the best validation epoch (loaded on return).

    Without validation bags the last epoch's weights are kept (no selection possible).
    ``progress_span`` is the part of the whole training this call covers (a federated
    round passes its share of the planned rounds); the model's schedules see it through
    ``set_progress``.

    With ``baseline_stage`` (a whole local run: `micromil train/cv`), a model whose
    ``needs_baseline_stage`` is true (MHIM with ``teacher_init: converged``) is trained
    twice: first as its base, selected on validation as
    usual; then, from those weights, with its own strategy for another ``cfg.epochs``,
    selecting among the second stage's epochs only. History and epoch numbers run on
    across both stages.
    """
    if not train_bags:
        raise ValueError("fit() got no training bags")
    model.to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    cw = (
        class_weights([b.label for b in train_bags], model.n_classes)
        if cfg.class_weighting
        else None
    )

    def run(n: int, span: tuple[float, float], offset: int) -> TrainResult:
        return _fit_stage(model, train_bags, val_bags, cfg, device, generator, cw, progress,
                          extra_loss, n, span, offset)

    n_epochs = epochs if epochs is not None else cfg.epochs
    if not (baseline_stage and model.needs_baseline_stage):
        return run(n_epochs, progress_span, 0)  # also every federated round
    if epochs is not None:
        raise ConfigError(
            "this model trains in two stages (a converged baseline first), so a fixed epoch "
            "count cannot be replayed; turn train.refit off or use the model's warmup instead "
            "(mhim: teacher_init: warmup)"
        )
    model.set_baseline_stage(True)
    try:
        baseline = run(n_epochs, (0.0, 0.0), 0)
    finally:
        model.set_baseline_stage(False)
    log.info("baseline stage: best epoch %d; the second stage starts from it", baseline.best_epoch)
    second = run(n_epochs, (0.0, 1.0), len(baseline.history))
    return replace(second, history=baseline.history + second.history)


def _fit_stage(
    model: MILModel,
    train_bags: list[Bag],
    val_bags: list[Bag],
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    cw: Tensor | None,
    progress: Callable[[EpochLog], None] | None,
    extra_loss: ExtraLoss | None,
    n_epochs: int,
    progress_span: tuple[float, float],
    epoch_offset: int,
) -> TrainResult:
    """One training run with a fresh optimiser and its own early stopping (see ``fit``)."""
    optimizer = build_optimizer(
        model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum
    )
    best_score, best_state, best_epoch = -math.inf, None, epoch_offset + n_epochs
    best_metrics: dict[str, float] = {}
    history: list[EpochLog] = []
    stale = 0
    stopped = False
    model.start_training()
    first, last = progress_span
    for step in range(1, n_epochs + 1):
        epoch = epoch_offset + step
        start = time.perf_counter()
        model.set_progress(first + (last - first) * (step - 1) / n_epochs)
        train_loss = train_one_epoch(
            model, train_bags, optimizer, cfg, device, generator, cw, extra_loss
        )
        val_metrics = evaluate_bags(model, val_bags, device, class_weight=cw) if val_bags else {}
        entry = EpochLog(
            epoch,
            train_loss,
            val_metrics.get("loss", math.nan),
            val_metrics,
            time.perf_counter() - start,
        )
        history.append(entry)
        if progress is not None:
            progress(entry)
        if not val_bags:
            continue
        better, score = _improved(cfg, val_metrics, best_score)
        if better:
            best_score, best_epoch, best_metrics = score, epoch, val_metrics
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
        if cfg.patience and step >= cfg.min_epochs and stale >= cfg.patience:
            stopped = True
            log.info("early stop at epoch %d (best epoch %d)", epoch, best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.finish_training()
    return TrainResult(best_epoch, best_metrics, history, stopped)
