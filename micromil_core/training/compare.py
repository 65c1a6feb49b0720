"""Two models on the same patients: the paired difference of ``evaluate --against``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from micromil_core.errors import SiteDataError
from micromil_core.io import write_json_atomic
from micromil_core.training.metrics import paired_bootstrap_difference
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



def mean_paired_difference(
    groups: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n_resamples: int = 2000,
    confidence: float = 0.95, seed: int = 0,
) -> dict[str, dict[str, float]] | None:
    """The mean over groups (sites) of model A's metric minus model B's, with an interval
    from a bootstrap that resamples each group's patients on its own (stratified by class),
    so every site keeps its weight of one. ``groups``: (labels, probs A, probs B) per site;
    only two-class groups with both classes present count (``sites``: how many). None when
    no group counts."""
    from micromil_core.training.metrics import (
        METRIC_KEYS,
        _binary_metrics_of_draws,
        _stratified_draws,
        classification_metrics,
    )

    usable = [(np.asarray(y, dtype=int), np.asarray(a, float), np.asarray(b, float)) for y, a, b in groups]
    usable = [g for g in usable if g[1].shape[1] == 2 and set(np.unique(g[0])) == {0, 1}]
    if not usable:
        return None
    rng = np.random.default_rng(seed)
    draws = {k: np.zeros(n_resamples) for k in METRIC_KEYS}
    point = dict.fromkeys(METRIC_KEYS, 0.0)
    for y, a, b in usable:
        draw, n0, n1 = _stratified_draws(y, n_resamples, rng)
        of_a, of_b = _binary_metrics_of_draws(a, draw, n0, n1), _binary_metrics_of_draws(b, draw, n0, n1)
        on_a, on_b = classification_metrics(y, a), classification_metrics(y, b)
        for k in METRIC_KEYS:
            draws[k] += (of_a[k] - of_b[k]) / len(usable)
            point[k] += (on_a[k] - on_b[k]) / len(usable)
    tail = 100 * (1 - confidence) / 2
    return {
        k: {"difference": float(point[k]), "low": float(np.percentile(draws[k], tail)),
            "high": float(np.percentile(draws[k], 100 - tail)), "sites": len(usable)}
        for k in METRIC_KEYS
    }


OWN_PATIENT_MODELS = ("local", "global", "personalised")


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
    pairs: dict[str, list] = {"personalised_minus_global": [], "personalised_minus_local": []}
    for site, path in sites.items():
        row: dict[str, Any] = {}
        preds = {}
        for kind in OWN_PATIENT_MODELS:
            m = evaluate_checkpoint(models[site][kind], [path], out / site / kind, split="test",
                                    data_cfg=data_cfg)
            row[kind] = {k: m[k] for k in ("auc", "accuracy", "balanced_accuracy", "n") if k in m}
            if "representative_diversity" in m:  # MicroMIL: personalising must not collapse it
                row[kind]["diversity"] = m["representative_diversity"]["mean"]
            preds[kind] = read_predictions(out / site / kind / "predictions.csv")
        for key, other in (("personalised_minus_global", "global"), ("personalised_minus_local", "local")):
            (_, y, probs), (_, _, base) = preds["personalised"], preds[other]
            row[key] = paired_bootstrap_difference(y, probs, base)
            pairs[key].append((y, probs, base))
        table["per_site"][site] = row
    for key, groups in pairs.items():
        table[f"mean_{key}"] = mean_paired_difference(groups)
    return table
