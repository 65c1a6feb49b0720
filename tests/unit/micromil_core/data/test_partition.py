"""Partitioning bags into simulated sites, and stratified folds / train-val splits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from micromil_core.data.partition import (
    PartitionSpec,
    parse_partition,
    partition_indices,
    partition_summary,
)
from micromil_core.data.splits import stratified_folds, train_val_split
from micromil_core.errors import ConfigError, SiteDataError

LABELS = np.array([0] * 120 + [1] * 80)


def positive_share_variance(spec: str, n_parts: int = 8, seeds: range = range(5)) -> float:
    """Mean over seeds of the variance of the positive share across parts."""
    out = []
    for seed in seeds:
        parts = partition_indices(LABELS, n_parts, spec, seed)
        out.append(np.var([LABELS[p].mean() for p in parts]))
    return float(np.mean(out))


# ------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("iid", PartitionSpec("iid")),
        (" IID ", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", 0.5)),
        ("size:1", PartitionSpec("size", 1.0)),
        ("size:0", PartitionSpec("size", 0.0)),
    ],
)
def test_parse_partition_valid(text: str, spec: PartitionSpec) -> None:
    assert parse_partition(text) == spec
    assert parse_partition(str(spec)) == spec  # str() round-trips


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("dirichlet", "needs a parameter"),
        ("dirichlet:abc", "not a number"),
        ("dirichlet:0", "alpha must be > 0"),
        ("dirichlet:-1", "alpha must be > 0"),
        ("size:-0.5", "sigma must be >= 0"),
        ("size:nan", "finite"),
        ("iid:3", "takes no parameter"),
        ("label-skew:0.5", "unknown kind 'label-skew'"),
        ("", "unknown kind"),
    ],
)
def test_parse_partition_invalid_lists_valid_forms(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_partition(text)
    msg = str(info.value)
    assert why in msg
    assert "iid" in msg and "dirichlet:<alpha>" in msg and "size:<sigma>" in msg


# -------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "dirichlet:1", "size:1.5"])
def test_partition_covers_once_and_is_deterministic(spec: str) -> None:
    parts = partition_indices(LABELS, 6, spec, seed=7)
    assert len(parts) == 6
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(LABELS)))  # disjoint and complete
    for p in parts:
        assert len(p) >= 2
        assert set(LABELS[p].tolist()) == {0, 1}  # both classes where possible
        assert np.all(np.diff(p) > 0)
    again = partition_indices(LABELS, 6, spec, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, 6, spec, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_and_label_mix() -> None:
    parts = partition_indices(LABELS, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        assert abs(LABELS[p].mean() - 0.4) < 0.07


def test_dirichlet_gives_label_skew() -> None:
    iid = positive_share_variance("iid")
    skewed = positive_share_variance("dirichlet:0.1")
    mild = positive_share_variance("dirichlet:100")
    assert iid < 0.002
    assert skewed > 0.05  # sites dominated by one class
    assert skewed > 20 * iid
    assert mild < 0.01  # large alpha approaches iid


def test_size_skew_keeps_labels_iid() -> None:
    parts = partition_indices(LABELS, 8, "size:1.5", seed=1)
    sizes = np.array([len(p) for p in parts])
    assert sizes.std() / sizes.mean() > 0.4  # iid would be ~0
    assert sizes.min() >= 2
    big = [p for p in parts if len(p) >= 20]
    assert big and all(abs(LABELS[p].mean() - 0.4) < 0.1 for p in big)
    same = partition_indices(LABELS, 8, "size:0", seed=1)
    assert max(map(len, same)) - min(map(len, same)) <= 1


def test_min_per_part_enforced() -> None:
    for seed in range(5):
        parts = partition_indices(LABELS, 10, "dirichlet:0.05", seed, min_per_part=8)
        assert min(len(p) for p in parts) >= 8


def test_dirichlet_fallback_warns(caplog: pytest.LogCaptureFixture) -> None:
    y = np.array([0] * 30 + [1] * 12)
    with caplog.at_level(logging.WARNING, logger="micromil_core.data.partition"):
        parts = partition_indices(y, 10, "dirichlet:0.01", seed=0)
    assert "moved a few bags" in caplog.text
    assert all(set(y[p].tolist()) == {0, 1} for p in parts)


def test_class_too_small_for_every_part_is_allowed() -> None:
    y = np.array([0] * 40 + [1] * 3)  # 3 positives cannot reach 5 parts
    parts = partition_indices(y, 5, "iid", seed=0)
    assert sum(int(y[p].sum()) for p in parts) == 3
    assert all(len(p) >= 2 for p in parts)


def test_partition_errors() -> None:
    with pytest.raises(ConfigError, match="cannot split 5 bags into 3 sites of at least 2"):
        partition_indices(np.zeros(5), 3, "iid", 0)
    with pytest.raises(ConfigError, match=">= 1"):
        partition_indices(LABELS, 0, "iid", 0)
    with pytest.raises(ConfigError, match="valid forms"):
        partition_indices(LABELS, 2, "random", 0)


def test_partition_summary() -> None:
    y = np.array(["neg", "pos", "neg", "neg"])
    assert partition_summary([np.array([0, 1]), np.array([2, 3])], y) == [
        {"size": 2, "per_class": {"neg": 1, "pos": 1}},
        {"size": 2, "per_class": {"neg": 2, "pos": 0}},
    ]


# ------------------------------------------------------------------------------ splits


def test_stratified_folds() -> None:
    folds = stratified_folds(LABELS, 10, seed=0)
    assert len(folds) == 10
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(LABELS)))
    for f in folds:
        assert len(f) == 20 and LABELS[f].sum() == 8  # 40 % positives in every fold
    again = stratified_folds(LABELS, 10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))


def test_stratified_folds_errors() -> None:
    with pytest.raises(SiteDataError, match=r"fewer patients than folds \{'1': 3\}.*n_folds <= 3"):
        stratified_folds([0] * 20 + [1] * 3, 5, seed=0)
    with pytest.raises(ConfigError, match=">= 2"):
        stratified_folds(LABELS, 1, seed=0)


def test_train_val_split_stratified() -> None:
    pool = np.arange(0, 200, 2)  # indices into the full label array
    train, val = train_val_split(pool, LABELS, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert set(train) | set(val) == set(pool) and not set(train) & set(val)
    assert LABELS[val].sum() == 8  # 40 % positives, like the pool
    again = train_val_split(pool, LABELS, 0.2, seed=3)
    assert np.array_equal(val, again[1])


def test_train_val_split_small_and_edge_cases() -> None:
    y = np.array([0, 0, 0, 1])  # a singleton class stays in train
    train, val = train_val_split(np.arange(4), y, 0.5, seed=0)
    assert 3 in train and len(val) == 2 and set(y[val]) == {0}
    train, val = train_val_split(np.arange(4), y, 0.0, seed=0)
    assert len(val) == 0 and len(train) == 4
    train, val = train_val_split(np.arange(5), np.zeros(5), 0.01, seed=0)
    assert len(val) == 1  # at least one validation patient when asked for any
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
        train_val_split(np.arange(4), y, 1.0, seed=0)
    with pytest.raises(ConfigError, match="out of range"):
        train_val_split(np.arange(10), y, 0.2, seed=0)
