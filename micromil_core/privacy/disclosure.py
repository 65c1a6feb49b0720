"""Small-count guard (statistical disclosure control) for what a site reports.

A metric computed over one patient is that patient's outcome: a validation "accuracy 0.0"
over one patient tells the coordinator that patient's label was predicted wrong, and its
loss gives the predicted probability away. So no metric, loss, ROC point or interval
computed over fewer than ``min_patients`` patients leaves a site. Each metric is judged by
the patients it is actually computed over:

- ``loss``, ``accuracy`` (and ``train_loss``): every patient evaluated;
- ``sensitivity`` / ``specificity`` of a two-class model: the positive / negative patients;
- ``auc``, its interval, the ROC points, ``balanced_accuracy``, ``f1`` and any
  multi-class sensitivity/specificity: every class, so the smallest class must reach it
  (an AUC over one positive patient is that patient's rank among the negatives);
- HMIL's ``fine_accuracy``: the patients with a fine label; the other fine metrics: the
  smallest fine class among them.

What is withheld is named on the wire by ``suppressed``, a bit mask (bit i set: metric
``wire.GUARDED_METRICS[i]`` withheld; one integer, which every Flower record type carries),
beside ``min_patients`` (the threshold in force) and the patient count ``num-examples``
that every reply carries anyway. The threshold is the stricter of the coordinator's and
the site's (``privacy.min_patients``), so a hospital can raise it but the coordinator
cannot lower it for the hospital.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from micromil_core.config import MIN_PATIENTS_FLOOR, LocalPrivacyConfig
from micromil_core.federated.wire import (
    GUARDED_METRICS,
    MIN_PATIENTS,
    PERSONAL_METRIC_KEYS,
    SUPPRESSED,
)

log = logging.getLogger(__name__)

_warned: set[int] = set()  # thresholds already warned about in this process
_OVER_ALL = ("loss", "accuracy", "train_loss")
# Every personal metric depends on each class (AUCs, the epoch they chose, and the folds:
# fewer CV folds than asked is the smaller class's patient count).
_OVER_EVERY_CLASS = ("auc", "auc_ci_low", "auc_ci_high", "roc_fpr", "roc_tpr", "balanced_accuracy", "f1",
                     *PERSONAL_METRIC_KEYS)


def effective_min_patients(site: LocalPrivacyConfig, coordinator: LocalPrivacyConfig) -> int:
    """The stricter of the two thresholds (a site may raise it, never have it lowered)."""
    k = max(site.min_patients, coordinator.min_patients)
    if k < MIN_PATIENTS_FLOOR and k not in _warned:
        _warned.add(k)
        log.warning(
            "small-count guard lowered to %d patients (below the default %d): metrics over "
            "so few patients can reveal an individual patient's outcome", k, MIN_PATIENTS_FLOOR,
        )
    return k


def patients_behind(
    key: str, n: int, class_counts: Mapping[int, int], n_classes: int,
    fine_n: int = 0, fine_class_counts: Mapping[int, int] | None = None,
) -> int:
    """How many patients metric ``key`` is computed over (its smallest group)."""
    smallest = min((class_counts.get(c, 0) for c in range(n_classes)), default=0)
    if key in _OVER_ALL:
        return n
    if key in ("sensitivity", "specificity") and n_classes == 2:
        return class_counts.get(1 if key == "sensitivity" else 0, 0)
    if key in _OVER_EVERY_CLASS or key in ("sensitivity", "specificity"):
        return smallest
    if key == "fine_accuracy":
        return fine_n
    if key.startswith("fine_"):
        counts = fine_class_counts or {}
        present = [v for v in counts.values() if v > 0]
        return min(present, default=0) if fine_n else 0
    return n  # anything else a site reports is over all its patients


def guard(
    metrics: Mapping[str, Any], keys: Iterable[str], min_patients: int, n: int,
    labels: Iterable[int] = (), n_classes: int = 2, fine_labels: Iterable[int] = (),
) -> dict[str, Any]:
    """``metrics`` without the ``keys`` computed over fewer than ``min_patients`` patients.

    ``labels``: the class index of each patient the metrics were computed over;
    ``fine_labels``: their fine class (-1 = unknown). The result carries ``min_patients``
    and, when anything was withheld, ``suppressed`` (see ``withheld``).
    """
    y = np.asarray(list(labels), dtype=int)
    class_counts = {int(c): int((y == c).sum()) for c in range(n_classes)}
    fine = np.asarray(list(fine_labels), dtype=int)
    fine = fine[fine >= 0]
    fine_counts = {int(c): int((fine == c).sum()) for c in np.unique(fine)}
    out = dict(metrics)
    dropped = [
        key for key in keys
        if key in out
        and patients_behind(key, n, class_counts, n_classes, int(fine.size), fine_counts) < min_patients
    ]
    for key in dropped:
        del out[key]
    return {**out, **withheld(dropped, min_patients)}


def withheld(keys: Iterable[str], min_patients: int) -> dict[str, Any]:
    """The wire markers for ``keys`` withheld under threshold ``min_patients``."""
    mask = sum(1 << GUARDED_METRICS.index(k) for k in set(keys))
    return {MIN_PATIENTS: int(min_patients), **({SUPPRESSED: mask} if mask else {})}


def withheld_names(value: Any) -> list[str]:
    """The metric names a reply's ``suppressed`` bit mask stands for (unknown bits dropped)."""
    try:
        mask = int(value)
    except (TypeError, ValueError):
        return []
    return [key for i, key in enumerate(GUARDED_METRICS) if mask >> i & 1]


def suppressed_note(min_patients: int) -> str:
    """How a withheld metric reads in logs, reports and the CLI."""
    return f"suppressed (n < {min_patients})"
