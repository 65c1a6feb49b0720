"""Split one dataset's bags into simulated hospitals (sites) with controlled heterogeneity.

Partition specs (strings, as they appear in configs and ``sites.yaml``):

* ``iid``: every site gets about the same number of bags with the global class mix.
* ``dirichlet:<alpha>``: label skew. For each class, the share of its bags that each site
  gets is drawn from Dirichlet(alpha, ..., alpha) (Hsu et al. 2019, arXiv 1909.06335);
  small alpha (0.1) gives sites dominated by one class, large alpha (100) is close to iid.
* ``size:<sigma>``: quantity skew with iid labels. Site sizes are proportional to
  log-normal(0, sigma) weights; sigma = 0 is iid, sigma = 1 gives roughly 10x size ratios.

Every site gets at least ``min_per_part`` bags and, where the class counts allow it, at least
one bag of every class: a site without positives cannot compute a local AUC, and in a real
federation such a hospital would not be recruited for a binary task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from micromil_core.data.splits import largest_remainder
from micromil_core.errors import ConfigError

log = logging.getLogger(__name__)

PARTITION_FORMS = ("iid", "dirichlet:<alpha>  (alpha > 0)", "size:<sigma>  (sigma >= 0)")
# Bounded resampling of Dirichlet draws before repairing the best one.
MAX_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec: ``kind`` in iid|dirichlet|size and its parameter."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def _spec_error(spec: object, why: str) -> ConfigError:
    return ConfigError(
        f"invalid partition {spec!r}: {why}; valid forms: "
        + ", ".join(PARTITION_FORMS)
        + " (e.g. 'dirichlet:0.5', 'size:1.0')"
    )


def parse_partition(spec: str | PartitionSpec) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:<alpha>`` or ``size:<sigma>``.

    Raises:
        ConfigError: anything else, listing the valid forms.
    """
    if isinstance(spec, PartitionSpec):
        return spec
    if not isinstance(spec, str):
        raise _spec_error(spec, "expected a string")
    text = spec.strip().lower()
    kind, sep, arg = text.partition(":")
    if kind == "iid":
        if sep:
            raise _spec_error(spec, "'iid' takes no parameter")
        return PartitionSpec("iid")
    if kind not in ("dirichlet", "size"):
        raise _spec_error(spec, f"unknown kind {kind!r}")
    if not arg:
        raise _spec_error(spec, f"{kind!r} needs a parameter after ':'")
    try:
        value = float(arg)
    except ValueError:
        raise _spec_error(spec, f"parameter {arg!r} is not a number") from None
    if not np.isfinite(value):
        raise _spec_error(spec, "parameter must be finite")
    if kind == "dirichlet" and value <= 0:
        raise _spec_error(spec, "alpha must be > 0")
    if kind == "size" and value < 0:
        raise _spec_error(spec, "sigma must be >= 0")
    return PartitionSpec(kind, value)


def _interleaved_order(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation in which every class is spread evenly, so any contiguous chunk of it
    has about the global class mix (a stratified shuffle)."""
    keys = np.empty(len(codes))
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        # Member k of a class sits at position ~ (k + jitter) / count along the sequence.
        keys[rng.permutation(members)] = (np.arange(len(members)) + rng.random(len(members))) / len(
            members
        )
    return np.argsort(keys, kind="stable")


def _chunks(order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Assignment vector: the first sizes[0] items of ``order`` to part 0, and so on."""
    assign = np.empty(len(order), dtype=np.int64)
    assign[order] = np.repeat(np.arange(len(sizes)), sizes)
    return assign


def _sizes(n: int, weights: np.ndarray, min_per_part: int) -> np.ndarray:
    spare = n - min_per_part * len(weights)
    return min_per_part + largest_remainder(weights / weights.sum() * spare, spare)


def _counts(assign: np.ndarray, codes: np.ndarray, n_parts: int, n_classes: int) -> np.ndarray:
    table = np.zeros((n_parts, n_classes), dtype=np.int64)
    np.add.at(table, (assign, codes), 1)
    return table  # (n_parts, n_classes)


def _violations(table: np.ndarray, min_per_part: int, need_class: np.ndarray) -> int:
    small = int(np.maximum(min_per_part - table.sum(1), 0).sum())
    missing = int(((table == 0) & need_class[None, :]).sum())
    return small + missing


def _repair(
    assign: np.ndarray,
    codes: np.ndarray,
    n_parts: int,
    n_classes: int,
    min_per_part: int,
    need_class: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Move single bags between parts until every part has ``min_per_part`` bags and every
    class in ``need_class``, disturbing the drawn distribution as little as possible."""
    assign = assign.copy()

    def move(donor: int, receiver: int, cls: int) -> None:
        candidates = np.flatnonzero((assign == donor) & (codes == cls))
        assign[rng.choice(candidates)] = receiver

    # Each move fixes one deficit and never creates one, so this terminates.
    for _ in range(len(codes) * (n_classes + 1)):
        table = _counts(assign, codes, n_parts, n_classes)
        sizes = table.sum(1)
        small = np.flatnonzero(sizes < min_per_part)
        if small.size:
            receiver = int(small[0])
            donors = np.flatnonzero(sizes > min_per_part)
            if not donors.size:
                break
            donor = int(donors[np.argmax(sizes[donors])])
            move(donor, receiver, int(np.argmax(table[donor])))
            continue
        lacking = np.argwhere((table == 0) & need_class[None, :])
        if not lacking.size:
            break
        receiver, cls = (int(v) for v in lacking[0])
        # The donor keeps this class (>= 2 of it) and its minimum size.
        ok = (table[:, cls] >= 2) & (sizes > min_per_part)
        if not ok.any():
            break
        donor = int(np.argmax(np.where(ok, table[:, cls], -1)))
        move(donor, receiver, cls)
    return assign


def partition_indices(
    labels: Sequence | np.ndarray,
    n_parts: int,
    spec: str | PartitionSpec,
    seed: int,
    min_per_part: int = 2,
) -> list[np.ndarray]:
    """Partition item indices ``0..n-1`` into ``n_parts`` disjoint parts by ``spec``.

    Deterministic for a given (labels, n_parts, spec, seed, min_per_part).

    Shapes:
        labels: (n,) class labels of the items (any hashable values)
        return: n_parts sorted index arrays that together cover 0..n-1 exactly once

    Raises:
        ConfigError: bad spec, ``n_parts`` < 1, or fewer than ``n_parts * min_per_part``
            items.
    """
    pspec = parse_partition(spec)
    y = np.asarray(labels)
    _check_partition_arguments(y, n_parts, min_per_part)
    n = len(y)
    _, codes = np.unique(y, return_inverse=True)
    codes = codes.reshape(-1)
    n_classes = int(codes.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    class_totals = np.bincount(codes, minlength=n_classes)
    # A class can be in every part only if it has at least one member per part.
    need_class = class_totals >= n_parts

    if pspec.kind in ("iid", "size"):
        assign = _size_assignment(codes, n_parts, pspec, min_per_part, rng)
    else:
        assign = _dirichlet_assignment(codes, n_parts, n_classes, pspec, min_per_part, need_class, rng)
    assign = _repair(assign, codes, n_parts, n_classes, min_per_part, need_class, rng)
    return [np.flatnonzero(assign == p) for p in range(n_parts)]


def _check_partition_arguments(y: np.ndarray, n_parts: int, min_per_part: int) -> None:
    if y.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {y.shape}")
    if not isinstance(n_parts, int | np.integer) or n_parts < 1:
        raise ConfigError(f"number of parts (sites) must be an integer >= 1, got {n_parts!r}")
    if min_per_part < 1:
        raise ConfigError(f"min_per_part must be >= 1, got {min_per_part}")
    n = len(y)
    if n < n_parts * min_per_part:
        raise ConfigError(
            f"cannot split {n} bags into {n_parts} sites of at least {min_per_part} bags; "
            f"use fewer sites or more bags"
        )


def _size_assignment(
    codes: np.ndarray,
    n_parts: int,
    pspec: PartitionSpec,
    min_per_part: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``iid`` and ``size:<sigma>``: stratified chunks of (log-normally skewed) sizes."""
    if pspec.kind == "iid" or pspec.value == 0:
        weights = np.ones(n_parts)
    else:
        weights = rng.lognormal(0.0, float(pspec.value), size=n_parts)
    sizes = _sizes(len(codes), weights, min_per_part)
    if pspec.kind == "iid":
        sizes = rng.permutation(sizes)  # which parts get the +1 remainders
    return _chunks(_interleaved_order(codes, rng), sizes)


def _dirichlet_assignment(
    codes: np.ndarray,
    n_parts: int,
    n_classes: int,
    pspec: PartitionSpec,
    min_per_part: int,
    need_class: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """``dirichlet:<alpha>``: the draw with the fewest deficits of up to
    ``MAX_DIRICHLET_TRIES``; :func:`_repair` fixes what is left."""
    alpha = float(pspec.value)  # type: ignore[arg-type]

    def draw() -> tuple[np.ndarray, int]:
        out = np.empty(len(codes), dtype=np.int64)
        for c in range(n_classes):
            members = rng.permutation(np.flatnonzero(codes == c))
            share = rng.dirichlet(np.full(n_parts, alpha))
            counts = largest_remainder(share * len(members), len(members))
            out[members] = np.repeat(np.arange(n_parts), counts)
        table = _counts(out, codes, n_parts, n_classes)
        return out, _violations(table, min_per_part, need_class)

    assign, best_bad = draw()
    tries = 1
    while best_bad and tries < MAX_DIRICHLET_TRIES:
        candidate, bad = draw()
        tries += 1
        if bad < best_bad:
            assign, best_bad = candidate, bad
    if best_bad:
        log.warning(
            "partition %s: no Dirichlet draw in %d gave every site >= %d bags and every "
            "class; moved a few bags between sites to fix %d deficit(s)",
            pspec,
            MAX_DIRICHLET_TRIES,
            min_per_part,
            best_bad,
        )
    else:
        log.debug("partition %s: valid draw after %d tries", pspec, tries)
    return assign


def partition_summary(parts: Sequence[np.ndarray], labels: Sequence | np.ndarray) -> list[dict]:
    """Per part: size and count per class (for logs and ``sites.yaml``)."""
    y = np.asarray(labels)
    classes = np.unique(y)
    return [
        {"size": int(len(p)), "per_class": {str(c): int((y[p] == c).sum()) for c in classes}}
        for p in parts
    ]
