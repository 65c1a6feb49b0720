"""Seeded, stratified splits of a site's patients: cross-validation folds and train/val.

All functions take integer (or any hashable) labels and return numpy index arrays, so they
serve bag lists, ``SiteData.patients`` and partitioning alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from micromil_core.errors import ConfigError, SiteDataError


def _as_labels(labels: Sequence | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {arr.shape}")
    return arr


def stratified_folds(labels: Sequence | np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Test indices of ``n_folds`` stratified, shuffled folds (the literature's k-fold CV).

    Every index appears in exactly one fold; each fold's class mix follows the whole.

    Shapes:
        labels: (n,)
        return: n_folds arrays of sorted test indices, about n / n_folds each

    Raises:
        ConfigError: ``n_folds`` < 2 or larger than the number of patients.
        SiteDataError: a class has fewer patients than folds.
    """
    y = _as_labels(labels)
    if not isinstance(n_folds, int | np.integer) or n_folds < 2:
        raise ConfigError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if n_folds > len(y):
        raise ConfigError(
            f"n_folds={n_folds} exceeds the number of patients ({len(y)}); use fewer folds"
        )
    classes, counts = np.unique(y, return_counts=True)
    small = {str(c): int(k) for c, k in zip(classes, counts, strict=True) if k < n_folds}
    if small:
        raise SiteDataError(
            f"stratified {n_folds}-fold split: class(es) with fewer patients than folds "
            f"{small}; use n_folds <= {int(counts.min())} or add patients"
        )
    from sklearn.model_selection import StratifiedKFold  # here: ~0.8 s to import, CV only

    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [np.sort(test) for _, test in skf.split(np.zeros(len(y)), y)]


def largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative real ``quotas`` to integers summing to ``total`` (Hamilton)."""
    base = np.floor(quotas).astype(int)
    short = total - int(base.sum())
    if short > 0:
        order = np.argsort(-(quotas - base), kind="stable")
        base[order[:short]] += 1
    return base


def train_val_split(
    indices: Sequence[int] | np.ndarray,
    labels: Sequence | np.ndarray,
    val_fraction: float,
    seed: int,
    min_per_class: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into train and validation parts, stratified by label where possible.

    ``labels`` is the full label array that ``indices`` index into (``labels[indices]`` are
    the labels of the pool), so fold indices from :func:`stratified_folds` can be passed
    as they are.

    Each class with at least 2 members in the pool sends about ``val_fraction`` of them to
    validation and keeps at least one for training; singleton classes stay in training.
    The validation size is ``round(val_fraction * n)`` (at least 1 when the fraction > 0 and
    that is possible), distributed over classes by largest remainder. ``min_per_class``
    raises it so that every class with room sends at least that many (a small site's
    validation set then holds each class, so its AUC is defined).

    Shapes:
        indices: (n,); labels: (>max(indices),)
        return: (train (n - v,), val (v,)), both sorted

    Raises:
        ConfigError: ``val_fraction`` outside [0, 1).
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    y_all = _as_labels(labels)
    if idx.size and (idx.min() < 0 or idx.max() >= len(y_all)):
        raise ConfigError(
            f"indices out of range for {len(y_all)} labels (min {idx.min()}, max {idx.max()}); "
            f"pass the full label array that the indices point into"
        )
    rng = np.random.default_rng(seed)
    if val_fraction == 0 or idx.size < 2:
        return np.sort(idx), np.zeros(0, dtype=np.int64)
    y = y_all[idx]
    classes = np.unique(y)
    members = [rng.permutation(idx[y == c]) for c in classes]
    capacity = np.array([len(m) - 1 for m in members])  # keep one of each class in train
    floor = np.minimum(min_per_class, capacity)
    n_val = min(max(1, round(val_fraction * idx.size), int(floor.sum())), int(capacity.sum()))
    if n_val <= 0:
        # Only singleton classes: stratification is impossible, take a plain random draw.
        perm = rng.permutation(idx)
        return np.sort(perm[1:]), np.sort(perm[:1])
    quotas = np.minimum(val_fraction * np.array([len(m) for m in members]), capacity)
    rest = n_val - int(floor.sum())  # shared by the usual quotas, on top of the floor
    take = floor + np.minimum(
        largest_remainder(quotas * rest / max(quotas.sum(), 1e-12), rest), capacity - floor
    )
    # Rounding against the caps can leave a few short: give them to classes with room.
    while int(take.sum()) < n_val:
        room = np.flatnonzero(take < capacity)
        take[room[np.argmax(capacity[room] - take[room])]] += 1
    val = np.concatenate([m[:k] for m, k in zip(members, take, strict=True)])
    train = np.concatenate([m[k:] for m, k in zip(members, take, strict=True)])
    return np.sort(train), np.sort(val)
