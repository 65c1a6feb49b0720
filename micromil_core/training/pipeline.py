"""Site folders in, trained/evaluated models out: what the CLI commands call.

Every function takes typed settings (``ExperimentConfig``) and paths, never an argparse
namespace, so notebooks, tests and the Flower client call the same code.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.config import DataConfig, ExperimentConfig, TrainConfig, build_config
from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.layout import FEATURES_DIR
from micromil_core.data.scaler import FeatureScaler
from micromil_core.data.site import SiteData, class_order, load_bags, load_site
from micromil_core.data.splits import stratified_folds, train_val_split
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.io import write_json_atomic, write_text_atomic
from micromil_core.models.registry import build_model, params_from_dict
from micromil_core.runtime import resolve_device, seed_everything, set_threads
from micromil_core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from micromil_core.training.mechanism import Picks, representative_diversity, representative_picks
from micromil_core.training.metrics import (
    METRIC_KEYS,
    bootstrap_intervals,
    calibration,
    check_threshold,
    classification_metrics,
    decide,
    fine_metrics,
    operating_points,
    paired_bootstrap_difference,
    summarize_folds,
)
from micromil_core.training.plots import plot_curves, plot_reliability, plot_roc
from micromil_core.training.recalibration import apply_calibration, fit_calibration
from micromil_core.training.trainer import (
    EpochLog,
    TrainResult,
    fit,
    iter_batches,
    metrics_from_predictions,
    predict_bags,
)

log = logging.getLogger(__name__)


@dataclass
class SiteBags:
    """One site's records and its bags (features loaded, not yet standardised)."""

    site: SiteData
    bags: list[Bag]
    feature_dir: Path

    def by_split(self, split: str) -> list[Bag]:
        ids = set(self.site.split_ids(split))
        return [b for b in self.bags if b.patient_id in ids]


def feature_dir_for(
    site_path: Path,
    patient_ids: Sequence[str],
    data_cfg: DataConfig,
    device: torch.device,
    progress: bool = False,
) -> Path:
    """Precomputed SITE/features, or the cache of features extracted with an encoder."""
    spec = data_cfg.encoder
    if not spec:
        return Path(site_path) / FEATURES_DIR
    from micromil_core.encoders import extract_site_features, get_encoder

    enc = get_encoder(spec, device=str(device), **data_cfg.encoder_options())
    result = extract_site_features(
        site_path,
        list(patient_ids),
        enc,
        batch_size=data_cfg.batch_size,
        progress=progress,
        crop_scales=data_cfg.crop_scales or None,
        scale_names=data_cfg.scales or None,
    )
    return result.feature_dir


def load_sites(
    site_paths: Sequence[str | Path],
    data_cfg: DataConfig,
    device: torch.device,
    classes: Sequence[str] | None = None,
    expected_dim: int | None = None,
    progress: bool = False,
    fine_classes: Sequence[str] | None = None,
    labels_required: bool = True,
) -> list[SiteBags]:
    """Load several sites with one shared class list and one feature dimension.

    Classes (and fine classes) default to the sorted union of the sites' labels, so every
    site indexes classes the same way; a site whose features differ in dimension is named
    in the error.
    """
    paths = [Path(p) for p in site_paths]
    if not paths:
        raise SiteDataError("no site folder given; pass at least one --data SITE")
    if classes is None or fine_classes is None:
        sites = [load_site(p, labels_required=labels_required) for p in paths]
        if classes is None:
            classes = list(class_order(c for s in sites for c in s.classes))
        if fine_classes is None:
            fines = [f for s in sites for f in s.fine_classes or ()]
            fine_classes = list(class_order(fines)) if fines else None
    out: list[SiteBags] = []
    for path in paths:
        site = load_site(
            path, classes=classes, fine_classes=fine_classes, labels_required=labels_required
        )
        ids = [p.patient_id for p in site.patients]
        fdir = feature_dir_for(path, ids, data_cfg, device, progress)
        bags = load_bags(site, feature_dir=fdir, expected_dim=expected_dim)
        dim = int(bags[0].features.shape[1])
        if expected_dim is None:
            expected_dim = dim
        out.append(SiteBags(site, bags, fdir))
    return out


def split_train_val_test(
    sb: SiteBags, cfg: TrainConfig, seed_offset: int = 0
) -> tuple[list[Bag], list[Bag], list[Bag]]:
    """Use the site's split column when present; otherwise carve a stratified validation set.

    A site with a split column but no ``val`` rows gets a validation set carved from its
    ``train`` rows. ``test`` rows are returned separately and never used for selection.
    """
    if sb.site.has_splits:
        train, val, test = sb.by_split("train"), sb.by_split("val"), sb.by_split("test")
        if val:
            return train, val, test
        pool = train
    else:
        pool, test = list(sb.bags), []
    labels = [b.label for b in pool]
    tr_idx, va_idx = train_val_split(
        np.arange(len(pool)), np.asarray(labels), cfg.val_fraction, cfg.seed + seed_offset
    )
    return [pool[i] for i in tr_idx], [pool[i] for i in va_idx], test


def _prepare_run(cfg: ExperimentConfig) -> torch.device:
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
    if scaler is not None:
        train_bags, val_bags = scaler.transform_all(train_bags), scaler.transform_all(val_bags)
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
    device = _prepare_run(cfg)
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
        scaled_val = scaler.transform_all(val) if scaler else val
        validation.update(fine_metrics_of(model, scaled_val, device))
        roc_curves["validation"] = predict_bags(model, scaled_val, device)
    metrics: dict[str, Any] = {
        "validation": validation,
        "best_epoch": result.best_epoch,
        "n_train": len(train),
        "n_val": len(val),
    }
    if test:
        scaled = scaler.transform_all(test) if scaler else test
        roc_curves["test"] = predict_bags(model, scaled, device)
        metrics["test"] = metrics_from_predictions(*roc_curves["test"])
        metrics["test"].update(fine_metrics_of(model, scaled, device))
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
        },
    )
    save_checkpoint(ckpt, out / "model.pt")
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
    )
    if roc_curves:  # none when a refit run has no test split: nothing left unseen to plot
        plot_roc(roc_curves, out / "roc.png", title=f"{cfg.model.name}: trained model")
    return metrics


def model_params(model: Any, cfg: ExperimentConfig) -> dict[str, Any]:
    """The full params of a built model (defaults filled in) for the checkpoint."""
    from micromil_core.models.registry import params_to_dict

    params = getattr(model, "params", None)
    return params_to_dict(params) if params is not None else dict(cfg.model.params)


@dataclass
class _LoadedCheckpoint:
    """A checkpoint's model on its device, and the sites to run it on."""

    ckpt: Checkpoint
    model: Any
    device: torch.device
    sites: list[SiteBags]

    def model_inputs(self, sb: SiteBags, bags: list[Bag]) -> list[Bag]:
        """``bags`` of site ``sb`` standardised the way the model was trained."""
        scaler = self.ckpt.scaler
        if self.ckpt.provenance.get("scaler") == "site":  # trained with per-site statistics
            scaler = FeatureScaler.fit(sb.bags)
        return scaler.transform_all(bags) if scaler else bags

    def predict(self, scaled: list[Bag], calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Labels (n,) and probabilities (n, C), recalibrated when the checkpoint says so."""
        y, probs = predict_bags(self.model, scaled, self.device)
        return y, apply_calibration(probs, self.ckpt.calibration) if calibrated else probs

    def explain(
        self, sb: SiteBags, bags: list[Bag], scaled: list[Bag], out: Path, threshold: float | None
    ) -> None:
        """Galleries of ``bags`` (raw) / ``scaled`` (model inputs) under OUT/<site>."""
        from micromil_core.explain import write_explanations

        write_explanations(
            self.model, self.ckpt, sb, bags, scaled, self.device, out / sb.site.name, threshold
        )


def _load_checkpoint_and_sites(
    checkpoint: str | Path,
    site_paths: Sequence[str | Path],
    device: str,
    data_cfg: DataConfig | None,
    progress: bool,
    labels_required: bool,
    threshold: float | None = None,
) -> _LoadedCheckpoint:
    ckpt = load_checkpoint(checkpoint)
    check_threshold(threshold, ckpt.n_classes)  # before any site data is read
    dev = resolve_device(device)
    model = ckpt.build_model().to(dev)
    if data_cfg is None:  # the encoder's options travel with the checkpoint's config
        data_cfg = build_config({"data": dict(ckpt.config.get("data", {}))}).data
    # Features must come from the encoder the model was trained on, whatever is asked.
    data_cfg = replace(data_cfg, encoder=ckpt.encoder)
    sites = load_sites(
        site_paths,
        data_cfg,
        dev,
        classes=ckpt.classes,
        expected_dim=ckpt.in_dim,
        progress=progress,
        # A hierarchical model's fine outputs follow the fine classes it was trained with.
        fine_classes=ckpt.fine_classes if ckpt.params.get("fine_to_coarse") else None,
        labels_required=labels_required,
    )
    return _LoadedCheckpoint(ckpt, model, dev, sites)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def evaluate_checkpoint(
    checkpoint: str | Path,
    site_paths: Sequence[str | Path],
    out: str | Path,
    split: str | None = None,
    explain: bool = False,
    device: str = "auto",
    data_cfg: DataConfig | None = None,
    progress: bool = False,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on every patient (or one split) of each site.

    ``threshold`` (binary models): call a patient positive when P(class 1) >= it instead
    of the most probable class; AUC does not depend on it. ``operating_points`` in the
    output lists the thresholds that reach 90 % and 95 % sensitivity on these patients:
    read them on validation patients (``split="val"``), never on the test split.

    Writes OUT/metrics.json (core keys over all sites pooled, plus ``per_site``; each with
    ``ci95``, bootstrap intervals over patients; ``calibration``: Brier score, ECE and
    reliability bins), OUT/predictions.csv (per patient: stays on this site's disk),
    OUT/roc.png and, for two-class models, OUT/calibration.png; with ``explain`` also
    OUT/explain/ galleries.
    """
    out = Path(out)
    run = _load_checkpoint_and_sites(
        checkpoint, site_paths, device, data_cfg, progress, True, threshold
    )
    ckpt, model, dev = run.ckpt, run.model, run.device
    per_site: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    all_y, all_p, rows = [], [], []
    all_fine: list[tuple[np.ndarray, np.ndarray]] = []
    all_picks: list[Picks] = []
    for sb in run.sites:
        bags = sb.by_split(split) if split else sb.bags
        if not bags:
            raise SiteDataError(f"site {sb.site.path}: no patients in split {split!r}")
        scaled = run.model_inputs(sb, bags)
        y, probs = run.predict(scaled)
        per_site[sb.site.name] = classification_metrics(y, probs, threshold)
        per_site[sb.site.name]["ci95"] = bootstrap_intervals(y, probs, threshold=threshold)
        fine = predict_fine(model, scaled, dev)
        if fine is not None:
            per_site[sb.site.name].update(fine_metrics(*fine))
            all_fine.append(fine)
        picks = representative_picks(model, scaled, dev)
        if picks is not None:  # MicroMIL: are its representatives distinct instances?
            per_site[sb.site.name]["representative_diversity"] = representative_diversity(picks)
            all_picks += picks
        curves[sb.site.name] = (y, probs)
        all_y.append(y)
        all_p.append(probs)
        for i, (bag, p) in enumerate(zip(bags, probs, strict=True)):
            row = [sb.site.name, bag.patient_id, ckpt.classes[bag.label], *map(float, p)]
            if fine is not None:  # a hierarchical model: the fine label and probabilities too
                fine_name = ckpt.fine_classes[fine[0][i]] if fine[0][i] >= 0 else ""
                row += [fine_name, *map(float, fine[1][i])]
            rows.append(row)
        if explain:
            run.explain(sb, bags, scaled, out / "explain", threshold)
    y_all, p_all = np.concatenate(all_y), np.concatenate(all_p)
    metrics: dict[str, Any] = classification_metrics(y_all, p_all, threshold)
    metrics["ci95"] = bootstrap_intervals(y_all, p_all, threshold=threshold)
    metrics["decision"] = "argmax" if threshold is None else f"P({ckpt.classes[1]}) >= {threshold}"
    metrics["operating_points"] = operating_points(y_all, p_all)
    metrics["calibration"] = calibration(y_all, p_all)
    if all_fine:
        metrics.update(fine_metrics(*(np.concatenate(a) for a in zip(*all_fine, strict=True))))
    if all_picks:
        metrics["representative_diversity"] = representative_diversity(all_picks)
    metrics["per_site"] = per_site
    metrics["checkpoint"] = str(checkpoint)
    metrics["split"] = split or "all"
    write_json_atomic(out / "metrics.json", metrics)
    header = ["site", "patient_id", "label", *[f"prob_{c}" for c in ckpt.classes]]
    if all_fine:
        header += ["fine_label", *[f"prob_fine_{c}" for c in ckpt.fine_classes]]
        # A site without fine outputs leaves those columns empty.
        rows = [r + [""] * (len(header) - len(r)) for r in rows]
    _write_csv(out / "predictions.csv", header, rows)
    if len(curves) > 1:
        curves["all sites"] = (y_all, p_all)
    plot_roc(curves, out / "roc.png", title=f"{ckpt.model_name}: evaluation")
    if "bins" in metrics["calibration"]:
        plot_reliability(
            metrics["calibration"]["bins"], out / "calibration.png",
            title=f"{ckpt.model_name}: calibration (ECE {metrics['calibration']['ece']:.3f})",
        )
    return metrics


def calibrate_checkpoint(
    checkpoint: str | Path,
    site_paths: Sequence[str | Path],
    out: str | Path,
    method: str = "platt",
    split: str | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Fit a recalibration of ``checkpoint``'s probabilities on these sites' patients and
    write the recalibrated copy to ``out`` (see ``training/recalibration.py``).

    Patients: ``split`` of each site; by default its ``val`` split when it has a split
    column, else all its patients. The test split is refused: results reported on it
    would no longer be independent of the calibration. Any earlier calibration is refitted
    from the raw probabilities. Returns the fit and the Brier score / ECE before and after
    on the fitting patients.
    """
    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise ConfigError(f"--out {out} is the input checkpoint; write the recalibrated model to a new file")
    if split == "test":
        raise ConfigError(
            "calibrating on the test split would make the results reported on it optimistic; "
            "use the val split or a separate set of patients"
        )
    run = _load_checkpoint_and_sites(checkpoint, site_paths, device, None, progress, True)
    ys, raw = [], []
    for sb in run.sites:
        chosen = split or ("val" if sb.site.has_splits else None)
        bags = sb.by_split(chosen) if chosen else sb.bags
        if not bags:
            raise SiteDataError(f"site {sb.site.path}: no patients in split {chosen!r} to calibrate on")
        y, probs = run.predict(run.model_inputs(sb, bags), calibrated=False)
        ys.append(y)
        raw.append(probs)
    y, probs = np.concatenate(ys), np.concatenate(raw)
    fit_info = fit_calibration(y, probs, method)
    after = apply_calibration(probs, fit_info)
    ckpt = replace(
        run.ckpt,
        calibration=fit_info,
        provenance={
            **run.ckpt.provenance,
            "calibrated_on": {
                "sites": [sb.site.name for sb in run.sites],
                "split": split or "val (or all patients where a site has no split column)",
                "n": int(len(y)),
                "date": _dt.date.today().isoformat(),
            },
        },
    )
    save_checkpoint(ckpt, out)
    return {
        **fit_info,
        "n": int(len(y)),
        "before": calibration(y, probs),
        "after": calibration(y, after),
        "checkpoint": str(out),
    }


def read_predictions(path: str | Path) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """An ``evaluate`` predictions.csv: (site, patient_id) keys, labels (n,), probs (n, C).

    Classes are the ``prob_<class>`` columns in file order (the checkpoint's order).
    """
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SiteDataError(f"{path}: no predictions; re-run `micromil evaluate`")
    classes = [c[len("prob_") :] for c in rows[0] if c.startswith("prob_") and "fine_" not in c]
    keys = [(r["site"], r["patient_id"]) for r in rows]
    y = np.array([classes.index(r["label"]) for r in rows], dtype=int)
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return keys, y, probs


def paired_difference(predictions_a: str | Path, predictions_b: str | Path) -> dict[str, Any] | None:
    """Metrics of model A minus model B from their ``evaluate`` predictions.csv files on the
    same patients, with paired bootstrap intervals (two-class tasks; None otherwise)."""
    keys_a, y, probs_a = read_predictions(predictions_a)
    keys_b, _, probs_b = read_predictions(predictions_b)
    if keys_a != keys_b:
        raise SiteDataError(
            f"{predictions_a} and {predictions_b} hold different patients; evaluate both "
            f"models on the same sites and split"
        )
    return paired_bootstrap_difference(y, probs_a, probs_b)


def add_paired_comparison(
    metrics: dict[str, Any],
    against: str | Path,
    site_paths: Sequence[str | Path],
    out: str | Path,
    split: str | None = None,
    device: str = "auto",
    threshold: float | None = None,
) -> dict[str, Any]:
    """Judge a second checkpoint on the patients of an ``evaluate_checkpoint`` run in
    ``out`` (its own outputs in OUT/against) and add ``against``: its headline metrics and
    the first model's metrics minus its own, with paired bootstrap intervals. Rewrites
    OUT/metrics.json; returns ``metrics``."""
    out = Path(out)
    base = evaluate_checkpoint(
        against, site_paths, out / "against", split=split, device=device, threshold=threshold
    )
    metrics["against"] = {
        "checkpoint": str(against),
        "metrics": {k: base[k] for k in ("auc", "accuracy", "balanced_accuracy", "n")},
        "difference": paired_difference(
            out / "predictions.csv", out / "against" / "predictions.csv"
        ),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def predict_checkpoint(
    checkpoint: str | Path,
    site_paths: Sequence[str | Path],
    out: str | Path,
    explain: bool = False,
    device: str = "auto",
    data_cfg: DataConfig | None = None,
    progress: bool = False,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Score patients whose diagnosis is not known (yet): the clinical use of a model.

    ``threshold`` (binary models): predict the second class when its probability is at
    least this, e.g. one chosen for 95 % sensitivity on validation patients
    (``evaluate``'s ``operating_points``); default: the most probable class.

    The sites' ``patients.csv`` need only a ``patient_id`` column; a label, where given,
    is copied to the output but never required. Writes OUT/predictions.csv (per patient:
    the predicted class and every class probability, plus the fine class of a
    hierarchical model) and OUT/summary.json (patients per predicted class and site: counts
    only); with ``explain`` also OUT/explain/ galleries. All of it stays on this site.
    """
    out = Path(out)
    run = _load_checkpoint_and_sites(
        checkpoint, site_paths, device, data_cfg, progress, False, threshold
    )
    ckpt = run.ckpt
    fine_names = ckpt.fine_classes if ckpt.params.get("fine_to_coarse") else None
    header = ["site", "patient_id", "predicted", *[f"prob_{c}" for c in ckpt.classes]]
    if fine_names:
        header += ["predicted_fine", *[f"prob_fine_{c}" for c in fine_names]]
    header.append("label")
    rows: list[list[Any]] = []
    per_site: dict[str, Any] = {}
    for sb in run.sites:
        scaled = run.model_inputs(sb, sb.bags)
        _, probs = run.predict(scaled)
        fine = predict_fine(run.model, scaled, run.device, labelled_only=False)
        predicted = decide(probs, threshold)
        for i, bag in enumerate(sb.bags):
            row = [sb.site.name, bag.patient_id, ckpt.classes[predicted[i]], *map(float, probs[i])]
            if fine_names:
                fine_probs = fine[1][i] if fine is not None else None
                row += (
                    [fine_names[int(fine_probs.argmax())], *map(float, fine_probs)]
                    if fine_probs is not None
                    else [""] * (len(fine_names) + 1)
                )
            row.append(ckpt.classes[bag.label] if bag.label >= 0 else "")
            rows.append(row)
        per_site[sb.site.name] = {
            "n": len(sb.bags),
            "predicted": {c: int((predicted == k).sum()) for k, c in enumerate(ckpt.classes)},
        }
        if explain:
            run.explain(sb, sb.bags, scaled, out / "explain", threshold)
    _write_csv(out / "predictions.csv", header, rows)
    summary = {
        "n": len(rows),
        "per_site": per_site,
        "classes": list(ckpt.classes),
        "checkpoint": str(checkpoint),
        "decision": (
            "the class of highest probability"
            if threshold is None
            else f"{ckpt.classes[1]} when its probability >= {threshold}"
        ),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


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
    device = _prepare_run(cfg)
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
