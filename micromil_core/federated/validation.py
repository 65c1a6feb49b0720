"""Checks on what a site sends back, before the coordinator uses any of it.

A reply is aggregated only if its weights are the global model's arrays (same names,
shapes and dtypes), every value is finite, and the update is not implausibly large
against the global model; its metrics must be known keys with sane values. Each check
returns the reason a reply is refused (``None`` when it passes), worded for the
coordinator's log, so one broken or hostile site is named and left out of the round
instead of poisoning the global model.

These checks catch malformed and grossly scaled updates. A subtle, well-scaled poisoned
update passes them: that is what the robust strategies (``fedmedian``,
``fedtrimmedavg``, ``krum``) are for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from micromil_core.federated import wire

# Metric keys whose values are fractions (AUC, accuracy, ...): anything outside [0, 1] is
# garbage, and would drag the patient-weighted mean over sites with it.
_FRACTION_SUFFIXES = (*wire.CORE_METRICS, "auc_ci_low", "auc_ci_high", "auc_global", "auc_personal")
# The only metrics that are lists: ROC points on the fixed grid. Any other list could carry
# per-patient numbers or weights into the coordinator's records.
_LIST_METRICS = ("roc_fpr", "roc_tpr")


def quoted_names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def update_problem(
    reference: Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray],
    max_update_ratio: float,
) -> str | None:
    """Why ``update`` (a site's returned weights) must not be aggregated, or None.

    ``max_update_ratio``: the largest allowed ||update - reference|| / ||reference|| over
    the floating-point arrays (0 = no bound).
    """
    missing = sorted(set(reference) - set(update))
    if missing:
        return f"missing model arrays {quoted_names(missing)}"
    extra = sorted(set(update) - set(reference))
    if extra:
        return f"unexpected model arrays {quoted_names(extra)}"
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            return f"array {name!r} has shape {tuple(arr.shape)}, the global model's is {tuple(ref.shape)}"
        if arr.dtype != ref.dtype:
            return f"array {name!r} has dtype {arr.dtype}, the global model's is {ref.dtype}"
        if np.issubdtype(arr.dtype, np.floating):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                return f"array {name!r} holds {bad} non-finite value(s) (NaN or Inf)"
    if max_update_ratio > 0:
        ratio = update_ratio(reference, update)
        if not math.isfinite(ratio) or ratio > max_update_ratio:
            return (
                f"update norm is {ratio:.3g}x the global model's norm, above the bound "
                f"federation.max_update_ratio={max_update_ratio:g}"
            )
    return None


def update_ratio(reference: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> float:
    """||update - reference|| / ||reference|| over the floating-point arrays (same names
    and shapes), an all-zero reference counted as norm 1."""
    diff_sq = ref_sq = 0.0
    for name, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            r = ref.ravel()
            # The difference in float32 at least (float16's rounding would show), the sums of
            # squares accumulated in float64 without float64 copies of the arrays: the
            # coordinator checks every site's ~1 M weights each round.
            d = np.subtract(update[name], ref, dtype=np.result_type(ref.dtype, np.float32)).ravel()
            diff_sq += float(np.einsum("i,i->", d, d, dtype=np.float64))
            ref_sq += float(np.einsum("i,i->", r, r, dtype=np.float64))
    return math.sqrt(diff_sq) / math.sqrt(ref_sq if ref_sq > 0 else 1.0)


def metrics_problem(
    metrics: Mapping[str, Any], allowed: frozenset[str], max_examples: int | None = None
) -> str | None:
    """Why a site's MetricRecord must not be used, or None.

    ``allowed``: the wire allow-list for this kind of reply; ``max_examples``: the patients
    the site declared before round 1 (it cannot weigh more than that in a weighted mean).
    """
    unknown = sorted(set(metrics) - allowed)
    if unknown:
        return f"unexpected metric keys {quoted_names(unknown)}"
    n = metrics.get(wire.NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0 or n != int(n):
        return f"{wire.NUM_EXAMPLES}={n!r} is not a patient count"
    if max_examples is not None and n > max_examples:
        return f"{wire.NUM_EXAMPLES}={int(n)} exceeds the {max_examples} patients the site declared"
    for key, value in metrics.items():
        if isinstance(value, list) and (key not in _LIST_METRICS or len(value) != len(wire.ROC_GRID)):
            return f"metric {key!r} is a list of {len(value)}; only ROC points on the fixed grid are"
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) for v in values):
            return f"metric {key!r} is not numeric"
        if any(math.isinf(v) for v in values):
            return f"metric {key!r} is infinite"
        if key.endswith(_FRACTION_SUFFIXES) or key in ("roc_fpr", "roc_tpr"):
            if any(not 0.0 <= v <= 1.0 for v in values if not math.isnan(v)):
                return f"metric {key!r}={value!r} is outside [0, 1]"
        elif key.endswith("loss") and any(v < 0 for v in values if not math.isnan(v)):
            return f"metric {key!r}={value!r} is negative"
    return None


def personal_metrics_problem(
    metrics: Mapping[str, Any], max_examples: int | None, max_epoch: int, max_folds: int | None = None
) -> str | None:
    """Why a personalise reply's numbers must not be used, or None: the wire's keys with
    sane values, counts that are counts within what the site declared, a chosen epoch
    the fine-tuning could have reached (``max_epoch``) and no more CV folds than asked."""
    problem = metrics_problem(metrics, wire.ALLOWED_PERSONAL_METRICS, max_examples)
    if problem:
        return problem
    folds_high = max_examples if max_folds is None else max_folds
    for key, high in ((wire.PERSONAL_EPOCH, max_epoch), (wire.NUM_VAL, max_examples),
                      (wire.PERSONAL_FOLDS, folds_high)):
        value = metrics.get(key)
        if value is None:
            continue
        if math.isnan(value) or value != int(value) or value < 0 or (high is not None and value > high):
            return f"metric {key!r}={value!r} is not a count in [0, {high}]"
    if metrics.get("seconds", 0.0) < 0:
        return f"metric 'seconds'={metrics['seconds']!r} is negative"
    return None
