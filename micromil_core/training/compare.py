"""Two models on the same patients: the paired difference of ``evaluate --against``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from micromil_core.errors import SiteDataError
from micromil_core.io import write_json_atomic
from micromil_core.training.metrics import (
    OWN_PATIENT_DIFFERENCES,
    OWN_PATIENT_MODELS,
    mean_paired_difference,
    paired_bootstrap_difference,
)
from micromil_core.training.score import evaluate_checkpoint


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



def paired_predictions(
    predictions_a: str | Path, predictions_b: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and both models' probabilities from two ``evaluate`` predictions.csv files,
    row for row the same patients (else one error saying so)."""
    keys_a, y, probs_a = read_predictions(predictions_a)
    keys_b, _, probs_b = read_predictions(predictions_b)
    if keys_a != keys_b or probs_a.shape != probs_b.shape:
        raise SiteDataError(
            f"{predictions_a} and {predictions_b} hold different patients; evaluate both "
            f"models on the same sites and split"
        )
    return y, probs_a, probs_b


def paired_difference(predictions_a: str | Path, predictions_b: str | Path) -> dict[str, Any] | None:
    """Metrics of model A minus model B from their ``evaluate`` predictions.csv files on the
    same patients, with paired bootstrap intervals (two-class tasks; None otherwise)."""
    return paired_bootstrap_difference(*paired_predictions(predictions_a, predictions_b))



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


def own_patients_comparison(
    sites: dict[str, Path], models: dict[str, dict[str, Path]], out: str | Path,
    data_cfg: Any = None,
) -> dict[str, Any]:
    """Each training site's local-only, global and personalised model judged on that
    site's own TEST patients (``models[site][kind]``: a model.pt per kind), with the paired
    differences personalised - global and personalised - local per site and their mean over
    sites (``mean_paired_difference``). Writes each evaluation under OUT/<site>/<kind>/."""
    out = Path(out)
    table: dict[str, Any] = {"per_site": {}}
    pairs: dict[str, list] = {key: [] for key in OWN_PATIENT_DIFFERENCES}
    for site, path in sites.items():
        row: dict[str, Any] = {}
        for kind in OWN_PATIENT_MODELS:
            m = evaluate_checkpoint(models[site][kind], [path], out / site / kind, split="test",
                                    data_cfg=data_cfg)
            row[kind] = {k: m[k] for k in ("auc", "accuracy", "balanced_accuracy", "n") if k in m}
            if "representative_diversity" in m:  # MicroMIL: personalising must not collapse it
                row[kind]["diversity"] = m["representative_diversity"]["mean"]
        for key, other in OWN_PATIENT_DIFFERENCES.items():
            y, probs, base = paired_predictions(out / site / "personalised" / "predictions.csv",
                                                out / site / other / "predictions.csv")
            row[key] = paired_bootstrap_difference(y, probs, base)
            pairs[key].append((y, probs, base))
        table["per_site"][site] = row
    for key, groups in pairs.items():
        table[f"mean_{key}"] = mean_paired_difference(groups)
    return table
