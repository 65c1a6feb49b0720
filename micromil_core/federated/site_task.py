"""One site's part of a federated round: describe, moments, local training, evaluation.

Pure torch/numpy: the Flower ClientApp calls these and packs the results. Everything
returned is aggregate (see ``wire``); patient ids are redacted from problem reports.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.config import MIN_PATIENTS_FLOOR, DataConfig, LocalPrivacyConfig, TrainConfig
from micromil_core.data.bag import Bag
from micromil_core.data.data_root import ROLES
from micromil_core.data.scaler import FeatureScaler, scale_bags
from micromil_core.data.site import load_site
from micromil_core.data.site_check import check_site
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.federated import wire
from micromil_core.models.base import MILModel
from micromil_core.models.registry import build_model
from micromil_core.privacy.disclosure import guard, withheld
from micromil_core.runtime import seed_everything
from micromil_core.training.fitting import fine_metrics_of
from micromil_core.training.loading import (
    SiteBags,
    feature_dir_for,
    load_sites,
    split_train_val_test,
)
from micromil_core.training.metrics import binary_roc, bootstrap_intervals
from micromil_core.training.trainer import fit, metrics_from_predictions, predict_bags

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SiteSettings:
    """This site's own settings (Flower node config): never sent anywhere."""

    name: str
    data_path: Path
    role: str = "train"
    # The site's own DP-SGD settings (its site.yaml in a deployment); the coordinator
    # cannot turn them off.
    privacy: LocalPrivacyConfig = LocalPrivacyConfig()
    state_dir: Path | None = None  # where the site keeps its privacy ledger

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SiteDataError(f"site {self.name}: role={self.role!r}; expected one of {ROLES}")
        if self.privacy.enabled and self.state_dir is None:
            raise SiteDataError(
                f"site {self.name}: DP-SGD needs a state folder for its privacy ledger; "
                "set supernode.state_dir in site.yaml"
            )


@dataclass(frozen=True)
class ModelSpec:
    """Enough to rebuild the global model anywhere."""

    name: str
    in_dim: int
    n_classes: int
    params: dict[str, Any]

    def build(self, state: dict[str, torch.Tensor] | None = None) -> MILModel:
        model = build_model(self.name, self.in_dim, self.n_classes, self.params)
        if state is not None:
            model.load_state_dict(state)
        return model


@dataclass
class SiteRuntime:
    """A site's bags, loaded once per process and split for training/evaluation."""

    settings: SiteSettings
    loaded: SiteBags
    train: list[Bag]
    val: list[Bag]
    test: list[Bag]

    @property
    def evaluation_bags(self) -> list[Bag]:
        """Held-out sites are judged on every patient; training sites on validation."""
        return self.loaded.bags if self.settings.role == "holdout" else self.val

    @functools.cached_property
    def own_scaler(self) -> FeatureScaler:
        """Standardisation from this site's own features (training patients; all patients
        at a held-out site, which has no labels to leak): for ``federation.scaler: site``."""
        return FeatureScaler.fit(self.train if self.settings.role == "train" else self.loaded.bags)

    def scaler_for(self, global_scaler: FeatureScaler | None, site_scaler: bool) -> FeatureScaler | None:
        return self.own_scaler if site_scaler else global_scaler


_RUNTIMES: dict[tuple, SiteRuntime] = {}


def load_runtime(
    settings: SiteSettings, data_cfg: DataConfig, train_cfg: TrainConfig, classes: list[str]
) -> SiteRuntime:
    """Load (or reuse, within one process) a site's bags with the federation's classes."""
    key = (settings, data_cfg, train_cfg.val_fraction, train_cfg.seed, tuple(classes))
    if key not in _RUNTIMES:
        (loaded,) = load_sites(
            [settings.data_path], data_cfg, torch.device("cpu"), classes=classes,
            fine_classes=data_cfg.fine_classes or None,
        )
        train, val, test = split_train_val_test(loaded, train_cfg)
        _RUNTIMES[key] = SiteRuntime(settings, loaded, train, val, test)
    return _RUNTIMES[key]


def forget_runtimes() -> None:
    """Drop the loaded bags: a long-lived ClientApp process calls this when a new run starts,
    so each run reads the site's data as it is then."""
    _RUNTIMES.clear()


# A file name as messages print it: slide and image names often carry a patient's barcode
# (TCGA-AB-1234-01Z.svs), which the id rule alone misses when the name extends the id.
_FILE_NAME = re.compile(
    r"(?<![\w.-])[\w.-]+\.(?:h5|hdf5|pt|pth|npy|npz|png|jpe?g|tiff?|svs|ndpi|mrxs|scn|bif|"
    r"vms|czi|bmp|gif|webp)(?![\w.-])", re.IGNORECASE,
)


def redact(text: str, patient_ids: list[str]) -> str:
    """Replace every patient id in ``text`` by ``<patient>`` (longest ids first), then what
    follows a patient's folder (``<patient>/scan 1/x.png``: its slides and images) and every
    other image or feature file name by ``<file>``."""
    for pid in sorted(patient_ids, key=len, reverse=True):
        if pid:
            text = re.sub(rf"(?<![\w-]){re.escape(pid)}(?![\w-])", "<patient>", text)
    text = re.sub(r"<patient>/[^\s'\",;:()]+", "<patient>/<file>", text)
    return _FILE_NAME.sub("<file>", text)


def describe_site(
    settings: SiteSettings, data_cfg: DataConfig
) -> tuple[dict[str, Any], dict[str, int]]:
    """What the server may know about a site before round 1.

    Returns (description: name, role, class names, redacted problems; counts: patients,
    per split/class counts, feature dim). Features are extracted (and cached) here when
    the federation uses an image encoder, so round 1 does not pay for it.
    """
    path = Path(settings.data_path)
    problems: list[str] = []
    counts: dict[str, int] = {"num_errors": 0, "num_warnings": 0}
    declared = list(data_cfg.classes) or None  # the labels are checked against them
    try:
        site = load_site(path, classes=declared)
    except SiteDataError as exc:
        return (
            {wire.SITE_NAME: settings.name, wire.SITE_ROLE: settings.role,
             wire.SITE_CLASSES: [], wire.SITE_PROBLEMS: [redact(_strip_path(str(exc), path), [])]},
            {**counts, "num_errors": 1},
        )
    ids = [p.patient_id for p in site.patients]
    try:
        fdir = feature_dir_for(path, ids, data_cfg, torch.device("cpu"))
    except SiteDataError as exc:
        problems.append(str(exc))
        fdir = None
    report = check_site(path, classes=declared, feature_dir=fdir)
    problems += report.errors
    if settings.privacy.enabled and settings.role == "train":
        from micromil_core.privacy.dp_sgd import check_delta

        try:
            check_delta(settings.privacy, len(site.patients), settings.name)
        except ConfigError as exc:
            problems.append(str(exc))
    counts["num_errors"] = len(problems)
    counts["num_warnings"] = len(report.warnings)
    labels = [p.label for p in site.patients]
    counts[wire.NUM_EXAMPLES] = len(site.patients)
    for i, cls in enumerate(site.classes):
        counts[f"class_count_{i}"] = labels.count(cls)
    if site.has_splits:
        for split in ("train", "val", "test"):
            counts[f"num_{split}"] = len(site.split_ids(split))
    dim = report.stats.get("feature_dim")
    if isinstance(dim, int):
        counts["feature_dim"] = dim
    description = {
        wire.SITE_NAME: settings.name,
        wire.SITE_ROLE: settings.role,
        wire.SITE_CLASSES: list(site.classes),
        wire.SITE_PROBLEMS: [redact(_strip_path(p, path), ids) for p in problems[:20]],
    }
    from micromil_core.encoders.base import identity_label
    from micromil_core.encoders.extract import read_encoder_identity

    if fdir is not None and (identity := read_encoder_identity(fdir)):
        description[wire.SITE_ENCODER] = identity_label(identity)
    if settings.role == "train":
        description[wire.SITE_PRIVACY] = settings.privacy.mode
    return description, counts


def _strip_path(text: str, path: Path) -> str:
    """Site paths can name a hospital's file system layout; keep them local."""
    return text.replace(str(path.resolve()), "SITE").replace(str(path), "SITE")


def feature_moments(runtime: SiteRuntime) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed first/second moments of the training instances (float64): (D,), (D,), count."""
    feats = torch.cat([b.features.double() for b in runtime.train])
    return feats.sum(0), (feats**2).sum(0), int(feats.shape[0])


def round_seed(seed: int, server_round: int, site_name: str) -> int:
    """A seed per (run seed, round, site): reproducible, different across rounds/sites."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{site_name}".encode()).hexdigest()
    return int(digest[:8], 16)


def proximal_term(model: MILModel, reference: dict[str, torch.Tensor], mu: float):
    """FedProx: (mu / 2) * ||w - w_global||^2 over trainable parameters."""
    device = next(model.parameters()).device
    ref = {k: v.detach().to(device) for k, v in reference.items()}  # moved once, not per step

    def term(m: MILModel) -> torch.Tensor:
        return 0.5 * mu * sum(((p - ref[name]) ** 2).sum() for name, p in m.named_parameters())

    return term


def proximal_gradient(reference: dict[str, torch.Tensor], mu: float):
    """FedProx's gradient mu * (w - w_global), added to a DP step after its noise: it
    depends only on the weights, so it costs no privacy."""
    from micromil_core.nn.gat import convert_gat_state

    # DP trains MicroMIL on the dense GAT backend, whose GAT keys differ from "pyg".
    dense = convert_gat_state(reference, "dense")

    def add(m: MILModel) -> None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                ref = reference.get(name, dense.get(name))
                if p.grad is not None and ref is not None:
                    p.grad += mu * (p - ref.to(p.device))

    return add


def train_round(
    runtime: SiteRuntime,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    train_cfg: TrainConfig,
    scaler: FeatureScaler | None,
    server_round: int,
    local_epochs: int,
    proximal_mu: float = 0.0,
    device: torch.device | None = None,
    run_id: str = "",
    planned_rounds: int = 1,
    min_patients: int = MIN_PATIENTS_FLOOR,
    reserve_rounds: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the global model locally for ``local_epochs``; return new weights + metrics.

    With the site's DP-SGD on, training is private (``privacy.site_round``) and the
    metrics carry the epsilon spent in this run (``run_id``) so far. The training loss
    is withheld when fewer than ``min_patients`` patients trained (``privacy.disclosure``).
    ``reserve_rounds``: DP-SGD rounds after the last one that the site's noise is calibrated
    for too (a personal fine-tuning, ``federated.personalise``).
    """
    settings = runtime.settings
    if settings.role != "train":
        raise SiteDataError(f"site {settings.name} is a held-out site and never trains")
    start = time.perf_counter()
    device = device or torch.device("cpu")
    seed = round_seed(train_cfg.seed, server_round, settings.name)
    seed_everything(seed)
    model = spec.build(state).to(device)
    bags = scale_bags(runtime.train, scaler)
    if settings.privacy.enabled:
        from micromil_core.privacy.site_round import private_train_round

        new_state, metrics = private_train_round(
            model, bags, settings.name, settings.privacy, settings.state_dir, run_id or "default",
            server_round, planned_rounds, local_epochs, train_cfg.lr, train_cfg.weight_decay,
            train_cfg.batch_size, device, seed,
            proximal_gradient(state, proximal_mu) if proximal_mu > 0 else None,
            optimizer=train_cfg.optimizer, momentum=train_cfg.momentum, reserve_rounds=reserve_rounds,
        )
    else:
        extra = proximal_term(model, state, proximal_mu) if proximal_mu > 0 else None
        cfg = replace(train_cfg, seed=seed)
        span = ((server_round - 1) / planned_rounds, server_round / planned_rounds)
        result = fit(
            model, bags, [], cfg, device, extra_loss=extra, epochs=local_epochs,
            progress_span=span if planned_rounds >= server_round else (1.0, 1.0),
        )
        new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        metrics = {"train_loss": float(result.history[-1].train_loss)}
    metrics[wire.NUM_EXAMPLES] = len(runtime.train)
    metrics["seconds"] = time.perf_counter() - start
    return new_state, guard(metrics, ("train_loss",), min_patients, len(runtime.train))


def evaluate_round(
    runtime: SiteRuntime,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    scaler: FeatureScaler | None,
    device: torch.device | None = None,
    min_patients: int = MIN_PATIENTS_FLOOR,
) -> dict[str, Any]:
    """Aggregate metrics of the global model on this site's evaluation patients.

    The ROC curve is shared only as TPR at the fixed FPR grid ``wire.ROC_GRID``; the AUC
    comes with its 95 % bootstrap interval over these patients (``wire.AUC_INTERVAL``).
    A hierarchical model adds its fine-level metrics (``FINE_METRIC_KEYS``, ``fine_n``).
    A metric computed over fewer than ``min_patients`` patients is withheld and counted
    (``privacy.disclosure``); with too few patients none is computed at all.
    """
    bags = runtime.evaluation_bags
    if len(bags) < min_patients:  # nothing is computed, so nothing can slip through
        return {wire.NUM_EXAMPLES: len(bags),
                **withheld((*wire.CORE_METRICS, "loss") if bags else (), min_patients)}
    device = device or torch.device("cpu")
    model = spec.build(state).to(device)
    scaled_bags = scale_bags(bags, scaler)
    y, probs = predict_bags(model, scaled_bags, device)
    metrics = metrics_from_predictions(y, probs)
    out: dict[str, Any] = {k: float(metrics[k]) for k in (*wire.CORE_METRICS, "loss")}
    out[wire.NUM_EXAMPLES] = len(bags)
    roc = binary_roc(y, probs)
    if roc is not None:
        fpr, tpr = roc
        out["roc_fpr"] = [float(v) for v in wire.ROC_GRID]
        out["roc_tpr"] = [float(v) for v in np.interp(wire.ROC_GRID, fpr, tpr)]
        # The same bootstrap as `micromil evaluate` (resamples, seed): one model on the same
        # patients gets one interval, wherever it is judged.
        low, high = bootstrap_intervals(y, probs)["auc"]
        if math.isfinite(low) and math.isfinite(high):
            out.update(zip(wire.AUC_INTERVAL, (low, high), strict=True))
    out.update({k: float(v) for k, v in fine_metrics_of(model, scaled_bags, device).items()})
    fine = [-1 if b.fine_label is None else b.fine_label for b in bags]
    return guard(out, wire.EVAL_METRIC_KEYS, min_patients, len(bags), y, spec.n_classes, fine)

