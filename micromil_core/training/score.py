"""Using a trained checkpoint on sites: ``evaluate``, ``calibrate`` and ``predict``."""

from __future__ import annotations

import csv
import datetime as _dt
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.config import DataConfig, build_config
from micromil_core.data.bag import Bag
from micromil_core.data.scaler import FeatureScaler, scale_bags
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.io import write_json_atomic, write_text_atomic
from micromil_core.runtime import resolve_device
from micromil_core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from micromil_core.training.fitting import predict_fine
from micromil_core.training.loading import SiteBags, load_sites
from micromil_core.training.mechanism import Picks, representative_diversity, representative_picks
from micromil_core.training.metrics import (
    bootstrap_intervals,
    calibration,
    check_threshold,
    classification_metrics,
    decide,
    fine_metrics,
    operating_points,
)
from micromil_core.training.plots import plot_reliability, plot_roc
from micromil_core.training.recalibration import apply_calibration, fit_calibration
from micromil_core.training.trainer import (
    predict_bags,
)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model on its device, and the sites to run it on."""

    ckpt: Checkpoint
    model: Any
    device: torch.device
    sites: list[SiteBags]
    progress: bool = False  # bars over long loops (the CLI's)

    def model_inputs(self, sb: SiteBags, bags: list[Bag]) -> list[Bag]:
        """``bags`` of site ``sb`` standardised the way the model was trained."""
        scaler = self.ckpt.scaler
        if self.ckpt.provenance.get("scaler") == "site":  # trained with per-site statistics
            scaler = FeatureScaler.fit(sb.bags)
        return scale_bags(bags, scaler)

    def predict(self, scaled: list[Bag], calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Labels (n,) and probabilities (n, C), recalibrated when the checkpoint says so."""
        y, probs = predict_bags(self.model, scaled, self.device)
        return y, apply_calibration(probs, self.ckpt.calibration) if calibrated else probs

    def explain(
        self, sb: SiteBags, bags: list[Bag], scaled: list[Bag], out: Path, threshold: float | None,
        heatmaps: bool = False,
    ) -> None:
        """Galleries of ``bags`` (raw) / ``scaled`` (model inputs) under OUT/<site>, with
        instance-score heatmaps on the slides' coordinates when ``heatmaps``."""
        from micromil_core.explain import write_explanations

        write_explanations(
            self.model, self.ckpt, sb, bags, scaled, self.device, out / sb.site.name, threshold,
            show_progress=self.progress, heatmaps=heatmaps,
        )



def load_checkpoint_and_sites(
    checkpoint: str | Path,
    site_paths: Sequence[str | Path],
    device: str,
    data_cfg: DataConfig | None,
    progress: bool,
    labels_required: bool,
    threshold: float | None = None,
) -> LoadedCheckpoint:
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
    return LoadedCheckpoint(ckpt, model, dev, sites, progress)



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
    heatmaps: bool = False,
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
    OUT/explain/ galleries (``heatmaps``: with instance scores drawn on slide coordinates).
    """
    if heatmaps and not explain:
        raise ConfigError("heatmaps are drawn into the explanation gallery: set explain too")
    out = Path(out)
    run = load_checkpoint_and_sites(
        checkpoint, site_paths, device, data_cfg, progress, True, threshold
    )
    ckpt = run.ckpt
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
        site = _evaluate_site(run, scaled, threshold)
        per_site[sb.site.name] = site.metrics
        if site.fine is not None:
            all_fine.append(site.fine)
        if site.picks is not None:
            all_picks += site.picks
        curves[sb.site.name] = (site.y, site.probs)
        all_y.append(site.y)
        all_p.append(site.probs)
        rows += _evaluation_rows(ckpt, sb.site.name, bags, site.probs, site.fine)
        if explain:
            run.explain(sb, bags, scaled, out / "explain", threshold, heatmaps)
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
    _write_evaluation_csv(out / "predictions.csv", ckpt, rows, with_fine=bool(all_fine))
    if len(curves) > 1:
        curves["all sites"] = (y_all, p_all)
    _plot_evaluation(out, ckpt, curves, metrics["calibration"])
    return metrics


@dataclass
class _SiteEvaluation:
    """One site's outputs. Shapes: y (n,), probs (n, C); fine (labels (n,), probs (n, F))."""

    y: np.ndarray
    probs: np.ndarray
    metrics: dict[str, Any]
    fine: tuple[np.ndarray, np.ndarray] | None
    picks: list[Picks] | None


def _evaluate_site(
    run: LoadedCheckpoint, scaled: list[Bag], threshold: float | None
) -> _SiteEvaluation:
    """Predictions and metrics (with ``ci95``, and fine metrics / representative diversity
    where the model has them) on one site's model inputs."""
    y, probs = run.predict(scaled)
    metrics = classification_metrics(y, probs, threshold)
    metrics["ci95"] = bootstrap_intervals(y, probs, threshold=threshold)
    fine = predict_fine(run.model, scaled, run.device)
    if fine is not None:
        metrics.update(fine_metrics(*fine))
    picks = representative_picks(run.model, scaled, run.device)
    if picks is not None:  # MicroMIL: are its representatives distinct instances?
        metrics["representative_diversity"] = representative_diversity(picks)
    return _SiteEvaluation(y, probs, metrics, fine, picks)


def _evaluation_rows(
    ckpt: Checkpoint,
    site_name: str,
    bags: list[Bag],
    probs: np.ndarray,
    fine: tuple[np.ndarray, np.ndarray] | None,
) -> list[list[Any]]:
    """predictions.csv rows of one site: site, patient, label, class probabilities."""
    rows = []
    for i, (bag, p) in enumerate(zip(bags, probs, strict=True)):
        row = [site_name, bag.patient_id, ckpt.classes[bag.label], *map(float, p)]
        if fine is not None:  # a hierarchical model: the fine label and probabilities too
            fine_name = ckpt.fine_classes[fine[0][i]] if fine[0][i] >= 0 else ""
            row += [fine_name, *map(float, fine[1][i])]
        rows.append(row)
    return rows


def _write_evaluation_csv(
    path: Path, ckpt: Checkpoint, rows: list[list[Any]], with_fine: bool
) -> None:
    header = ["site", "patient_id", "label", *[f"prob_{c}" for c in ckpt.classes]]
    if with_fine:
        header += ["fine_label", *[f"prob_fine_{c}" for c in ckpt.fine_classes]]
        # A site without fine outputs leaves those columns empty.
        rows = [r + [""] * (len(header) - len(r)) for r in rows]
    _write_csv(path, header, rows)


def _plot_evaluation(
    out: Path,
    ckpt: Checkpoint,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    calib: dict[str, Any],
) -> None:
    """OUT/roc.png and, where ``calibration`` has reliability bins, OUT/calibration.png."""
    plot_roc(curves, out / "roc.png", title=f"{ckpt.model_name}: evaluation")
    if "bins" in calib:
        plot_reliability(
            calib["bins"], out / "calibration.png",
            title=f"{ckpt.model_name}: calibration (ECE {calib['ece']:.3f})",
        )


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
    run = load_checkpoint_and_sites(checkpoint, site_paths, device, None, progress, True)
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
    run = load_checkpoint_and_sites(
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

