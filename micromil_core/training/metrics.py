"""Patient-level classification metrics, one definition for every command.

Binary tasks use the positive class = class index 1 and, by default, the argmax decision.
A user may fix another operating point (``threshold``: positive when P(class 1) >= it),
chosen on validation patients with :func:`operating_points`; nothing here tunes one.
Multi-class tasks report one-vs-rest macro AUC and macro averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from micromil_core.errors import ConfigError


def _sk():
    """scikit-learn's metrics, imported on first use: the import takes ~0.8 s, and a
    federated site starts a fresh process per message, most of which compute no metric."""
    import sklearn.metrics

    return sklearn.metrics

METRIC_KEYS = ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")
# Fine-level metrics of hierarchical models (HMIL), next to the core keys when available.
FINE_METRIC_KEYS = ("fine_accuracy", "fine_balanced_accuracy", "fine_macro_f1", "fine_auc")


def check_threshold(threshold: float | None, n_classes: int) -> None:
    """Refuse a decision threshold that cannot apply (None, the argmax, always can).

    Raises:
        ConfigError: a threshold outside [0, 1] or for a model that is not two-class.
    """
    if threshold is None:
        return
    if n_classes != 2:
        raise ConfigError(
            f"a decision threshold applies to two-class models only; this one has "
            f"{n_classes} classes (leave the threshold out: the most probable class)"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"decision threshold {threshold} is not a probability in [0, 1]")


def decide(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Predicted class per patient: argmax, or for a binary task with ``threshold``, class 1
    when its probability is at least the threshold (see :func:`check_threshold`)."""
    probs = np.asarray(probs, dtype=float)
    check_threshold(threshold, probs.shape[1])
    if threshold is None:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(int)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """Core metrics from labels (n,) and class probabilities (n, C).

    AUC is NaN when only one class is present (it is undefined there, not 0.5). The
    decision is :func:`decide`'s (argmax unless a binary ``threshold`` is given).
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    n_classes = probs.shape[1]
    y_pred = decide(probs, threshold)
    labels = list(range(n_classes))
    cm = _sk().confusion_matrix(y_true, y_pred, labels=labels)
    tp = np.diag(cm).astype(float)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    if n_classes == 2:
        sensitivity, specificity = recall[1], spec[1]
        f1 = _sk().f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0)
    else:
        sensitivity, specificity = np.nanmean(recall), np.nanmean(spec)
        f1 = _sk().f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "auc": roc_auc(y_true, probs),
        "accuracy": float(_sk().accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(_sk().balanced_accuracy_score(y_true, y_pred))
        if len(np.unique(y_true)) > 1
        else float(_sk().accuracy_score(y_true, y_pred)),
        "f1": float(f1),
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "n": int(len(y_true)),
    }


def bootstrap_intervals(
    y_true: np.ndarray,
    probs: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    threshold: float | None = None,
) -> dict[str, list[float]]:
    """Percentile intervals of ``METRIC_KEYS`` from a stratified bootstrap over patients.

    Each resample draws, with replacement, as many patients of each class as there are, so
    every resample has the class mix of the data and AUC stays defined. A held-out hospital
    of 19 patients gives an AUC interval about 0.5 wide: the intervals say how far a figure
    can be trusted. Metrics undefined on the data (AUC with one class) get [nan, nan].
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    rng = np.random.default_rng(seed)
    if probs.shape[1] == 2 and set(np.unique(y_true)) == {0, 1}:
        draw, n0, n1 = _stratified_draws(y_true, n_resamples, rng)
        draws = _binary_metrics_of_draws(probs, draw, n0, n1, threshold)
    else:  # multi-class or one class only: the general (slower) path, fewer resamples
        by_class = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
        rows = []
        for _ in range(min(n_resamples, 500)):
            idx = np.concatenate([rng.choice(members, size=members.size) for members in by_class])
            rows.append(classification_metrics(y_true[idx], probs[idx], threshold))
        draws = {key: np.array([r[key] for r in rows], dtype=float) for key in METRIC_KEYS}
    tail = 100 * (1 - confidence) / 2
    out: dict[str, list[float]] = {}
    for key in METRIC_KEYS:
        v = draws[key][np.isfinite(draws[key])]
        out[key] = (
            [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
            if v.size
            else [math.nan, math.nan]
        )
    return out


def _stratified_draws(y_true: np.ndarray, n_resamples: int, rng: np.random.Generator):
    """(R, n) patient indices, negatives first: each row resamples each class in full."""
    pos, neg = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
    draw = np.concatenate(
        [rng.choice(neg, size=(n_resamples, neg.size)), rng.choice(pos, size=(n_resamples, pos.size))],
        axis=1,
    )
    return draw, neg.size, pos.size


def _binary_metrics_of_draws(
    probs: np.ndarray, draw: np.ndarray, n0: int, n1: int, threshold: float | None = None
) -> dict[str, np.ndarray]:
    """``METRIC_KEYS`` of every resample in ``draw`` (from :func:`_stratified_draws`).

    Same definitions as :func:`classification_metrics`: :func:`decide`'s decision (argmax,
    a tie going to class 0, unless a ``threshold`` is given), AUC as the probability that a
    positive outranks a negative (ties count 1/2).
    """
    from scipy.stats import rankdata

    ranks = rankdata(probs[draw, 1], axis=1)  # average ranks for ties
    auc = (ranks[:, n0:].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    called = decide(probs, threshold)[draw].astype(bool)
    tp = called[:, n0:].sum(axis=1)
    fp = called[:, :n0].sum(axis=1)
    sens, spec = tp / n1, (n0 - fp) / n0
    denom = 2 * tp + fp + (n1 - tp)
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(draw)), where=denom > 0)
    return {
        "auc": auc,
        "accuracy": (tp + n0 - fp) / (n0 + n1),
        "balanced_accuracy": (sens + spec) / 2,
        "f1": f1,
        "sensitivity": sens,
        "specificity": spec,
    }


def paired_bootstrap_difference(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]] | None:
    """Metric of model A minus model B on the same patients, with a paired interval.

    Both models are scored on every resample of the same stratified bootstrap, so what the
    two share (which patients happen to be easy) cancels out: the interval is the one to
    read when asking whether A beats B on these patients. Binary tasks with both classes
    present; None otherwise. Per key: ``difference`` (on all patients), ``low``, ``high``.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs_a, probs_b = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    if probs_a.shape != probs_b.shape or len(probs_a) != len(y_true):
        raise ValueError(f"predictions of different shapes: {probs_a.shape} vs {probs_b.shape}")
    # One site: the mean over sites is its own difference, drawn the same way.
    out = mean_paired_difference([(y_true, probs_a, probs_b)], n_resamples, confidence, seed)
    return None if out is None else {k: {f: v[f] for f in ("difference", "low", "high")} for k, v in out.items()}


# ``compare --personalise``: the models judged on each training site's own test patients,
# and the paired differences of its table (key -> the model personalised is set against).
OWN_PATIENT_MODELS = ("local", "global", "personalised")
OWN_PATIENT_DIFFERENCES = {"personalised_minus_global": "global", "personalised_minus_local": "local"}


def mean_paired_difference(
    groups: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n_resamples: int = 2000,
    confidence: float = 0.95, seed: int = 0,
) -> dict[str, dict[str, float]] | None:
    """The mean over groups (sites) of model A's metric minus model B's, with an interval
    from a bootstrap that resamples each group's patients on its own (stratified by class),
    so every site keeps its weight of one. ``groups``: (labels (n,), probs A, probs B) per
    site, the probabilities (n, C), or (R, n, C) for R runs (training seeds) on the same
    patients, whose differences are averaged on every resample of those patients. Only
    two-class groups with both classes present count (``sites``: how many); None when none
    does. The sites are taken as given (only patients are resampled): the interval is about
    these hospitals, not hospitals in general."""
    usable = []
    for y, a, b in groups:
        y, a, b = np.asarray(y, dtype=int), np.asarray(a, float), np.asarray(b, float)
        a, b = (a[None], b[None]) if a.ndim == 2 else (a, b)
        if a.ndim != 3 or a.shape != b.shape or a.shape[1] != len(y):
            raise ValueError(f"a group's predictions differ in shape: {a.shape}, {b.shape}, {len(y)} labels")
        if a.shape[2] == 2 and set(np.unique(y)) == {0, 1}:
            usable.append((y, a, b))
    if not usable:
        return None
    rng = np.random.default_rng(seed)
    draws = {k: np.zeros(n_resamples) for k in METRIC_KEYS}
    point = dict.fromkeys(METRIC_KEYS, 0.0)
    for y, runs_a, runs_b in usable:
        draw, n0, n1 = _stratified_draws(y, n_resamples, rng)
        weight = 1.0 / (len(usable) * len(runs_a))
        for a, b in zip(runs_a, runs_b, strict=True):
            of_a, of_b = _binary_metrics_of_draws(a, draw, n0, n1), _binary_metrics_of_draws(b, draw, n0, n1)
            on_a, on_b = classification_metrics(y, a), classification_metrics(y, b)
            for k in METRIC_KEYS:
                draws[k] += (of_a[k] - of_b[k]) * weight
                point[k] += (on_a[k] - on_b[k]) * weight
    tail = 100 * (1 - confidence) / 2
    return {
        k: {"difference": float(point[k]), "low": float(np.percentile(draws[k], tail)),
            "high": float(np.percentile(draws[k], 100 - tail)), "sites": len(usable)}
        for k in METRIC_KEYS
    }


def operating_points(
    y_true: np.ndarray, probs: np.ndarray, sensitivities: Sequence[float] = (0.90, 0.95)
) -> list[dict[str, float]]:
    """For each target sensitivity, the highest threshold that reaches it on these patients.

    The clinical way to pick a decision threshold: on VALIDATION patients, find where the
    model flags e.g. 95 % of the positive patients and what specificity that costs, then
    fix that threshold for new patients (``micromil predict --threshold``). Each entry:
    ``target``, ``threshold``, ``sensitivity`` and ``specificity`` at that threshold.
    Binary tasks with both classes present; empty otherwise.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if probs.shape[1] != 2 or set(np.unique(y_true)) != {0, 1}:
        return []
    fpr, tpr, thresholds = _sk().roc_curve(y_true, probs[:, 1])
    out = []
    for target in sensitivities:
        i = int(np.argmax(tpr >= target - 1e-12))  # first (highest) threshold reaching it
        threshold = float(min(thresholds[i], 1.0))  # sklearn's first threshold is inf
        out.append(
            {
                "target": float(target),
                "threshold": threshold,
                "sensitivity": float(tpr[i]),
                "specificity": float(1.0 - fpr[i]),
            }
        )
    return out


def calibration(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """How far the predicted probabilities can be taken at face value.

    ``brier``: binary tasks, the mean of (P(class 1) - label)^2 (0 is perfect, 0.25 a
    constant 50/50 guess); more classes, Brier's sum over classes of the squared gap to
    the one-hot label. For binary tasks also the reliability ``bins`` (equal-width bins of
    P(class 1): mean predicted probability, observed fraction of class 1, patients) and
    ``ece``, the patient-weighted mean gap between the two. Calibration matters when a
    probability is read as a risk, and it shifts when a hospital's prevalence differs
    from the training patients'.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if probs.shape[1] != 2:
        onehot = np.eye(probs.shape[1])[y_true]
        return {"brier": float(((probs - onehot) ** 2).sum(axis=1).mean())}
    out: dict[str, Any] = {"brier": float(((probs[:, 1] - y_true) ** 2).mean())}
    p1 = probs[:, 1]
    which = np.minimum((p1 * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        members = which == b
        if not members.any():
            continue
        mean_p, observed = float(p1[members].mean()), float((y_true[members] == 1).mean())
        bins.append({"mean_predicted": mean_p, "observed": observed, "n": int(members.sum())})
        ece += members.mean() * abs(mean_p - observed)
    out.update(ece=float(ece), bins=bins)
    return out


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    y_true = np.asarray(y_true, dtype=int)
    present = np.unique(y_true)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(_sk().roc_auc_score(y_true, probs[:, 1]))
    return float(
        _sk().roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])))
    )


def fine_metrics(y_fine: np.ndarray, fine_probs: np.ndarray) -> dict[str, float]:
    """``FINE_METRIC_KEYS`` (+ ``fine_n``) over the bags whose fine label is known.

    Fine labels y_fine (n,) with -1 = unknown, fine probabilities (n, F). Balanced accuracy
    and macro F1 average over the fine classes present in y_fine; ``fine_auc`` is the macro
    one-vs-rest AUC over those classes (NaN when fewer than two are present). Empty dict
    when no bag has a fine label.
    """
    y_fine = np.asarray(y_fine, dtype=int)
    known = y_fine >= 0
    if not known.any():
        return {}
    y, probs = y_fine[known], np.asarray(fine_probs, dtype=float)[known]
    y_pred = probs.argmax(axis=1)
    present = np.unique(y)
    auc = (
        float(np.mean([_sk().roc_auc_score(y == c, probs[:, c]) for c in present]))
        if len(present) > 1
        else math.nan
    )
    return {
        "fine_accuracy": float(_sk().accuracy_score(y, y_pred)),
        # Mean recall over the classes present (sklearn's definition, without its warning
        # when a prediction falls in a class absent from y).
        "fine_balanced_accuracy": float(np.mean([(y_pred[y == c] == c).mean() for c in present])),
        "fine_macro_f1": float(
            _sk().f1_score(y, y_pred, labels=list(present), average="macro", zero_division=0)
        ),
        "fine_auc": auc,
        "fine_n": int(known.sum()),
    }


def binary_roc(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of class 1 vs rest, or None when undefined."""
    y_true = np.asarray(y_true, dtype=int)
    if len(np.unique(y_true)) < 2:
        return None
    score = probs[:, 1] if probs.shape[1] >= 2 else probs[:, 0]
    fpr, tpr, _ = _sk().roc_curve((y_true == 1).astype(int), score)
    return fpr, tpr


def summarize_folds(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """``<metric>_mean`` and ``<metric>_std`` over folds (NaN folds ignored); fine metrics
    too when every fold has them."""
    out: dict[str, float] = {}
    fine = [k for k in FINE_METRIC_KEYS if per_fold and all(k in m for m in per_fold)]
    for key in (*METRIC_KEYS, *fine):
        values = np.array([m[key] for m in per_fold], dtype=float)
        finite = values[np.isfinite(values)]
        out[f"{key}_mean"] = float(finite.mean()) if finite.size else math.nan
        out[f"{key}_std"] = float(finite.std(ddof=0)) if finite.size else math.nan
    out["folds"] = len(per_fold)
    return out


def corrected_paired_ttest(
    differences: np.ndarray, test_train_ratio: float, confidence: float = 0.95
) -> dict[str, float]:
    """Is model B better than model A over repeated k-fold CV on the same folds?

    ``differences`` holds B - A per fold (all repeats; NaN folds are dropped). Folds of
    repeated CV share most of their training data, so the plain paired t-test's standard
    error is far too small; Nadeau and Bengio's correction (Machine Learning 52, 2003)
    inflates the variance by ``test_train_ratio`` (n_test / n_train, 1/(k-1) for k folds),
    which no number of repeats can shrink. ``test_train_ratio=0`` is the plain test.
    ``low``/``high`` bound the mean difference at ``confidence`` with the same SE.
    """
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    n = d.size
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 finite differences, got {n}")
    mean = float(d.mean())
    se = math.sqrt((1.0 / n + test_train_ratio) * float(d.var(ddof=1)))
    if se == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), df=n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * se
    return {"mean": mean, "se": se, "t": float(t), "p": p, "n": n, "low": mean - half, "high": mean + half}
