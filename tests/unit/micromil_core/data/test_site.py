"""Site folders: patients.csv parsing, feature files, bags, check_site and sites.yaml.

Every bad input must give the intended error type and a message that names the file, the
row and the value. Sites are tiny folders written into tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from micromil_core.data.bag import UNLABELLED
from micromil_core.data.data_root import DataRoot, SiteEntry, read_sites_yaml, write_sites_yaml
from micromil_core.data.features import read_feature_file, write_feature_file
from micromil_core.data.site import load_bags, load_site
from micromil_core.data.site_check import check_site
from micromil_core.errors import ConfigError, FeatureError, SiteDataError

DIM = 8


def make_site(
    root: Path,
    csv_text: str | None,
    features: dict[str, torch.Tensor] | None = None,
    name: str = "site",
) -> Path:
    """A site folder with the given patients.csv text and .pt features."""
    site = root / name
    site.mkdir(parents=True, exist_ok=True)
    if csv_text is not None:
        (site / "patients.csv").write_text(csv_text)
    for pid, feats in (features or {}).items():
        (site / "features").mkdir(exist_ok=True)
        torch.save(feats, site / "features" / f"{pid}.pt")
    return site


def feats(n: int, d: int = DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


GOOD_CSV = (
    "patient_id,label,split,fine_label\n"
    "p1,malignant,train,ductal\n"
    "p2,benign,train,\n"
    "p3,malignant,val,lobular\n"
    "p4,benign,test,normal\n"
)


# ----------------------------------------------------------------------------- load_site


def test_load_site_parses_records_classes_and_splits(tmp_path: Path) -> None:
    site = make_site(tmp_path, GOOD_CSV)
    data = load_site(site)
    assert data.name == "site"
    assert data.patient_ids == ["p1", "p2", "p3", "p4"]
    assert data.classes == ("benign", "malignant")
    assert data.fine_classes == ("ductal", "lobular", "normal")
    assert [r.row for r in data.patients] == [2, 3, 4, 5]  # header is row 1
    assert data.patients[1].fine_label is None  # empty fine label = unknown
    assert data.has_splits
    assert data.split_ids("train") == ["p1", "p2"]
    assert data.split_ids("val") == ["p3"]
    assert data.label_index(data.patients[0]) == 1
    assert data.labels() == [1, 0, 1, 0]


def test_load_site_classes_given_fix_the_order(tmp_path: Path) -> None:
    site = make_site(tmp_path, GOOD_CSV)
    data = load_site(site, classes=["malignant", "benign"])
    assert data.labels() == [0, 1, 0, 1]


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    site = make_site(tmp_path, "patient_id,label\na,10\nb,2\nc,1\n")
    assert load_site(site).classes == ("1", "2", "10")


def test_tolerates_bom_whitespace_and_blank_lines(tmp_path: Path) -> None:
    site = make_site(tmp_path, "\ufeffpatient_id , label\n p1 , pos \n\nP2,neg\n\n")
    data = load_site(site)
    assert data.patient_ids == ["p1", "P2"]
    assert data.patients[1].row == 4  # blank line 3 still counts as a line
    assert not data.has_splits


def test_split_ids_without_split_column(tmp_path: Path) -> None:
    data = load_site(make_site(tmp_path, "patient_id,label\na,x\nb,y\n"))
    with pytest.raises(SiteDataError, match="no split column"):
        data.split_ids("train")
    with pytest.raises(ConfigError, match="unknown split 'validation'"):
        data.split_ids("validation")


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        (None, ["patients.csv not found", "patient_id,label[,split][,fine_label]"]),
        ("", ["patients.csv is empty"]),
        ("\n\n", ["patients.csv is empty"]),
        ("patient_id,diagnosis\np1,a\n", ["row 1", "missing required column(s) ['label']"]),
        ("patient_id,label,label\np1,a,b\n", ["duplicate column"]),
        ("patient_id,label\n", ["header but no patient rows"]),
        (
            "patient_id,label\np1,a\np2,b\np1,a\n",
            ["row 4: duplicate patient_id 'p1' (first at row 2)"],
        ),
        ("patient_id,label\n,a\n", ["row 2: empty patient_id"]),
        ("patient_id,label\np1,\n", ["row 2: empty label for patient 'p1'"]),
        ("patient_id,label\nward/p1,a\n", ["row 2: patient_id 'ward/p1' contains a path sep"]),
        ("patient_id,label\nward\\p1,a\n", ["row 2", "path separator"]),
        ("patient_id,label\n..p1,a\n", ["row 2: patient_id '..p1' contains '..'"]),
        (
            "patient_id,label,split\np1,a,train\np2,b,validation\n",
            ["row 3: split 'validation' not in {train, val, test}"],
        ),
        ("patient_id,label,split\np1,a,\n", ["row 2: empty split"]),
        ("patient_id,label\np1,a,extra\n", ["row 2: 3 fields but the header has 2"]),
    ],
)
def test_bad_patients_csv(tmp_path: Path, csv_text: str | None, expected: list[str]) -> None:
    site = make_site(tmp_path, csv_text)
    with pytest.raises(SiteDataError) as info:
        load_site(site)
    for text in expected:
        assert text in str(info.value)


def test_missing_site_folder(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="site folder not found"):
        load_site(tmp_path / "nowhere")


def test_label_not_in_classes_message(tmp_path: Path) -> None:
    rows = "".join(f"p{i},benign\n" for i in range(15)) + "p15,malignent\n"
    site = make_site(tmp_path, "patient_id,label\n" + rows)
    with pytest.raises(SiteDataError) as info:
        load_site(site, classes=["benign", "malignant"])
    msg = str(info.value)
    assert "patients.csv row 17: label 'malignent' not in {benign, malignant}" in msg
    assert str(site / "patients.csv") in msg  # names the file


def test_fine_label_not_in_fine_classes(tmp_path: Path) -> None:
    site = make_site(tmp_path, GOOD_CSV)
    with pytest.raises(SiteDataError, match=r"row 5: fine_label 'normal' not in \{ductal, lob"):
        load_site(site, fine_classes=["ductal", "lobular"])


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    site = make_site(tmp_path, "patient_id,label,split\np1,a,train\n,a,train\np1,b,tset\n")
    with pytest.raises(SiteDataError) as info:
        load_site(site)
    msg = str(info.value)
    assert "3 problems" in msg
    assert "row 3: empty patient_id" in msg
    assert "row 4: duplicate patient_id 'p1'" in msg
    assert "row 4: split 'tset'" in msg


def test_malformed_classes_argument(tmp_path: Path) -> None:
    site = make_site(tmp_path, GOOD_CSV)
    with pytest.raises(ConfigError, match="distinct"):
        load_site(site, classes=["a", "a"])


# ------------------------------------------------------------------------ feature files


def test_read_feature_file_formats(tmp_path: Path) -> None:
    x = feats(5)
    torch.save(x, tmp_path / "a.pt")
    torch.save({"features": x.double(), "coords": torch.zeros(5, 2)}, tmp_path / "b.pt")
    np.save(tmp_path / "c.npy", x.numpy())
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        fh["features"] = x.numpy()
        fh["coords"] = np.zeros((5, 2))
    write_feature_file(tmp_path / "e.pt", x)
    for name in ("a.pt", "b.pt", "c.npy", "d.h5", "e.pt"):
        got = read_feature_file(tmp_path / name, expected_dim=DIM)
        assert got.dtype == torch.float32 and got.shape == (5, DIM)
        assert torch.allclose(got, x)


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("junk.pt", lambda p: p.write_bytes(b"not a torch file"), "cannot read feature file"),
        ("junk.h5", lambda p: p.write_bytes(b"\x89HDF garbage"), "cannot read feature file"),
        ("junk.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01"), "cannot read feature file"),
        ("one_d.pt", lambda p: torch.save(torch.zeros(4), p), "must be 2-D"),
        ("empty.pt", lambda p: torch.save(torch.zeros(0, DIM), p), "empty bag (0 instances)"),
        ("nokey.pt", lambda p: torch.save({"x": torch.zeros(2, 2)}, p), "without key 'features'"),
        ("nofeat.h5", lambda p: h5py.File(p, "w").close(), "no dataset 'features'"),
        ("feat.txt", lambda p: p.write_text("1,2"), "unsupported feature file extension"),
    ],
)
def test_bad_feature_files(tmp_path: Path, name: str, make, expected: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(FeatureError) as info:
        read_feature_file(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_nan_rows_are_named(tmp_path: Path) -> None:
    x = feats(6)
    x[3, 1] = float("nan")
    x[5, 0] = float("inf")
    torch.save(x, tmp_path / "p.pt")
    with pytest.raises(FeatureError, match=r"NaN/Inf in 2 of 6 instance rows \(0-based rows: 3, 5"):
        read_feature_file(tmp_path / "p.pt")


def test_dim_mismatch_names_file_expected_and_got(tmp_path: Path) -> None:
    torch.save(feats(3, 4), tmp_path / "p7.pt")
    with pytest.raises(FeatureError) as info:
        read_feature_file(tmp_path / "p7.pt", expected_dim=DIM)
    assert "expected 8, got 4" in str(info.value)
    assert "p7.pt" in str(info.value)


def test_missing_feature_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureError, match="not found"):
        read_feature_file(tmp_path / "none.pt")


# ---------------------------------------------------------------------------- load_bags


def test_load_bags_maps_labels_and_fine_labels(tmp_path: Path) -> None:
    site = make_site(tmp_path, GOOD_CSV, {f"p{i}": feats(i + 1, seed=i) for i in range(1, 5)})
    data = load_site(site, classes=["benign", "malignant"])
    bags = load_bags(data)
    assert [b.patient_id for b in bags] == ["p1", "p2", "p3", "p4"]
    assert [b.label for b in bags] == [1, 0, 1, 0]
    assert [b.fine_label for b in bags] == [0, None, 1, 2]
    assert [b.num_instances for b in bags] == [2, 3, 4, 5]
    subset = load_bags(data, patient_ids=data.split_ids("train")[::-1])
    assert [b.patient_id for b in subset] == ["p2", "p1"]


def test_unlabelled_patients_only_when_scoring(tmp_path: Path) -> None:
    ids_only = make_site(tmp_path / "a", "patient_id\np1\np2\n", {"p1": feats(2), "p2": feats(3)})
    with pytest.raises(SiteDataError, match="missing required column.*micromil predict"):
        load_site(ids_only)
    data = load_site(ids_only, classes=["benign", "malignant"], labels_required=False)
    assert [b.label for b in load_bags(data)] == [UNLABELLED, UNLABELLED]
    # Some labels known: those map as usual, the empty ones are unlabelled.
    mixed = make_site(tmp_path / "b", "patient_id,label\np1,malignant\np2,\n")
    with pytest.raises(SiteDataError, match="row 3: empty label.*micromil predict"):
        load_site(mixed)
    data = load_site(mixed, classes=["benign", "malignant"], labels_required=False)
    assert [data.label_index(r) for r in data.patients] == [1, UNLABELLED]
    # check_site of a folder to score: no errors, no class-balance warnings, a count.
    assert not check_site(ids_only).ok
    report = check_site(ids_only, labels_required=False)
    assert report.ok and report.warnings == [] and report.stats["unlabelled"] == 2
    assert "unlabelled=2" in report.format()
    # A label that is given must still be one of the model's classes.
    typo = make_site(tmp_path / "c", "patient_id,label\np1,malignent\n")
    with pytest.raises(SiteDataError, match="row 2: label 'malignent'.*leave it empty"):
        load_site(typo, classes=["benign", "malignant"], labels_required=False)


def test_load_bags_feature_dir_override(tmp_path: Path) -> None:
    site = make_site(tmp_path, "patient_id,label\na,x\nb,y\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    for pid in ("a", "b"):
        np.save(cache / f"{pid}.npy", feats(2).numpy())
    bags = load_bags(load_site(site), feature_dir=cache, expected_dim=DIM)
    assert len(bags) == 2


def test_load_bags_missing_features_says_how_to_fix(tmp_path: Path) -> None:
    site = make_site(tmp_path, "patient_id,label\np1,a\np2,b\n", {"p1": feats(2)})
    with pytest.raises(SiteDataError) as info:
        load_bags(load_site(site))
    msg = str(info.value)
    assert "patient 'p2'" in msg and "row 3" in msg
    assert "features/p2.pt" in msg and "images/p2/" in msg and "--encoder NAME" in msg


def test_load_bags_inconsistent_dims(tmp_path: Path) -> None:
    site = make_site(
        tmp_path, "patient_id,label\np1,a\np2,b\n", {"p1": feats(2, 8), "p2": feats(2, 16)}
    )
    with pytest.raises(FeatureError, match="expected 8, got 16"):
        load_bags(load_site(site))


def test_load_bags_unknown_patient(tmp_path: Path) -> None:
    site = make_site(tmp_path, "patient_id,label\np1,a\n", {"p1": feats(2)})
    with pytest.raises(SiteDataError, match="patient 'p9' is not listed"):
        load_bags(load_site(site), patient_ids=["p9"])


# ---------------------------------------------------------------------------- check_site


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)


def test_check_site_good(tmp_path: Path) -> None:
    rows = "".join(
        f"p{i},{'pos' if i % 2 else 'neg'},{['train', 'train', 'val', 'test'][i % 4]}\n"
        for i in range(12)
    )
    site = make_site(
        tmp_path, "patient_id,label,split\n" + rows, {f"p{i}": feats(i % 3 + 1) for i in range(12)}
    )
    _png(site / "images" / "p0" / "a.png")
    report = check_site(site)
    assert report.ok, report.format()
    assert report.warnings == []
    s = report.stats
    assert s["n_patients"] == 12
    assert s["patients_per_class"] == {"neg": 6, "pos": 6}
    assert s["patients_per_split"] == {"train": 6, "val": 3, "test": 3}
    assert s["instances"] == {"source": "features", "min": 1, "mean": 2.0, "max": 3}
    assert s["feature_dim"] == DIM and s["has_features"] and s["has_images"]
    text = report.format()
    assert "OK" in text and "patients: 12" in text and "dim 8" in text
    json.dumps(report.to_dict())  # serialisable as it is


def test_check_site_collects_every_problem(tmp_path: Path) -> None:
    csv_text = (
        "patient_id,label,split,age\n"
        "ok1,neg,train,50\n"
        "nan1,neg,train,51\n"
        "bad1,neg,test,52\n"
        "dim1,neg,train,53\n"
        "none1,neg,train,54\n"
        "img1,neg,train,55\n"
    )
    nan = feats(3)
    nan[1, 0] = float("nan")
    site = make_site(
        tmp_path, csv_text, {"ok1": feats(2), "nan1": nan, "dim1": feats(2, 5), "ok2": feats(2)}
    )
    (site / "features" / "bad1.pt").write_bytes(b"garbage")
    (site / "images" / "img1").mkdir(parents=True)
    (site / "images" / "img1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _png(site / "images" / "img1" / "1.png")
    report = check_site(site)  # must not raise
    assert not report.ok
    errors = "\n".join(report.errors)
    assert "nan1.pt: NaN/Inf" in errors
    assert "bad1.pt: cannot read" in errors
    assert "dim1.pt: feature dimension 5 differs from the site's 8" in errors
    assert "row 6: patient 'none1' has neither images" in errors
    assert "0.png: unreadable image" in errors
    assert len(report.errors) == 5
    warnings = "\n".join(report.warnings)
    assert "single-class site" in warnings
    assert "tiny site" in warnings
    assert "no 'val' patients" in warnings
    assert "unknown column(s) ['age']" in warnings
    assert "patients not in patients.csv" in warnings  # features/ok2.pt
    assert report.stats["n_needs_extraction"] == 1
    assert "PROBLEMS FOUND" in report.format()


def test_check_site_on_unparseable_csv(tmp_path: Path) -> None:
    report = check_site(make_site(tmp_path, None))
    assert not report.ok
    assert "patients.csv not found" in report.errors[0]
    assert "PROBLEMS FOUND" in report.format()


def test_check_site_row_problems_listed_together(tmp_path: Path) -> None:
    site = make_site(tmp_path, "patient_id,label\na/b,x\nc,\n")
    report = check_site(site, classes=["x", "y"])
    assert len(report.errors) >= 2
    assert any("row 2" in e for e in report.errors) and any("row 3" in e for e in report.errors)


# ---------------------------------------------------------------------------- sites.yaml


def test_sites_yaml_round_trip(tmp_path: Path) -> None:
    for name in ("site-0", "site-1", "site-2"):
        (tmp_path / name).mkdir()
    info = DataRoot(
        root=tmp_path,
        dataset="demo",
        classes=("negative", "positive"),
        sites=[
            SiteEntry("site-0", "train", tmp_path / "site-0", 10),
            SiteEntry("site-1", "train", Path("site-1")),
            SiteEntry("site-2", "holdout", tmp_path / "site-2", 5),
        ],
        feature_dim=166,
        partition="dirichlet:0.5",
        seed=3,
        extra={"source": {"kind": "x"}},
    )
    write_sites_yaml(tmp_path, info)
    raw = yaml.safe_load((tmp_path / "sites.yaml").read_text())
    assert raw["sites"][0] == {
        "name": "site-0",
        "role": "train",
        "path": "site-0",
        "n_patients": 10,
    }
    back = read_sites_yaml(tmp_path)
    assert back.classes == ("negative", "positive")
    assert back.train_sites == [tmp_path / "site-0", tmp_path / "site-1"]
    assert back.holdout_sites == [tmp_path / "site-2"]
    assert (back.feature_dim, back.partition, back.seed) == (166, "dirichlet:0.5", 3)
    assert back.extra == {"source": {"kind": "x"}}
    assert back.site("site-2").n_patients == 5


def test_sites_yaml_missing(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as info:
        read_sites_yaml(tmp_path)
    assert "sites.yaml not found" in str(info.value) and "`micromil datasets prepare`" in str(info.value)  # a command that exists


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("classes: [a, b\n", "not valid YAML"),
        ("- just a list\n", "expected a mapping"),
        ("classes: [a, b]\n", "missing key(s) ['sites']"),
        ("classes: [a]\nsites: [{name: s}]\n", "at least 2 distinct"),
        ("classes: [a, b]\nsites: [{name: s, role: eval}]\n", "role 'eval'"),
        ("classes: [a, b]\nsites: [{name: s}, {name: s}]\n", "duplicate site name 's'"),
        ("classes: [a, b]\nsites: [{name: s, role: holdout}]\n", "no site has role 'train'"),
        ("classes: [a, b]\nfeature_dim: -3\nsites: [{name: s}]\n", "'feature_dim' must be"),
        ("classes: [a, b]\nsites: [{name: gone}]\n", "site folder(s) not found"),
    ],
)
def test_sites_yaml_malformed(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "sites.yaml").write_text(text)
    with pytest.raises(SiteDataError) as info:
        read_sites_yaml(tmp_path)
    assert expected in str(info.value)
    assert "sites.yaml" in str(info.value)


def test_write_sites_yaml_validates_first(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="role 'eval'"):
        write_sites_yaml(
            tmp_path, {"classes": ["a", "b"], "sites": [{"name": "s", "role": "eval"}]}
        )
    assert not (tmp_path / "sites.yaml").exists()
