"""Several slides or captures per patient: one bag, the slide of each instance kept.

Tiny seeded features (plumbing only); images are the real histology crops of tests/data.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from micromil_core.data.bag import BagBatch
from micromil_core.data.features import read_slide_file
from micromil_core.data.layout import ImagePlace, image_layout_problem, image_place
from micromil_core.data.site import load_bags, load_site
from micromil_core.data.site_check import check_site
from micromil_core.encoders import extract_site_features, get_encoder
from micromil_core.encoders.images import read_image
from micromil_core.errors import FeatureError, ImageError, SiteDataError

DATA = Path(__file__).resolve().parents[3] / "data"
D = 4
CLASSES = ["benign", "malignant"]


def _csv(site: Path, labels: dict[str, str]) -> None:
    site.mkdir(parents=True, exist_ok=True)
    with open(site / "patients.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "label"])
        writer.writerows(labels.items())


def _h5(path: Path, feats: np.ndarray, coords: np.ndarray | None = None, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh["features"] = feats
        if coords is not None:
            fh["coords"] = coords
        for key, value in extra.items():
            fh[key] = value


def _feats(n: int, seed: int, dim: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _two_slide_site(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """p1: slides c.npy (1 row), a.h5 (3 rows, coords), b.pt (2 rows), written out of
    name order; p2: one file, as before."""
    site = root / "site"
    _csv(site, {"p1": "benign", "p2": "malignant"})
    parts = {"a": _feats(3, 1), "b": _feats(2, 2), "c": _feats(1, 3), "p2": _feats(4, 4)}
    folder = site / "features" / "p1"
    folder.mkdir(parents=True)
    np.save(folder / "c.npy", parts["c"])
    _h5(folder / "a.h5", parts["a"], np.array([[0, 0], [256, 0], [0, 256]]))
    torch.save(torch.from_numpy(parts["b"]), folder / "b.pt")
    torch.save(torch.from_numpy(parts["p2"]), site / "features" / "p2.pt")
    return site, parts


def test_slides_of_a_patient_become_one_bag_in_file_name_order(tmp_path: Path) -> None:
    site, parts = _two_slide_site(tmp_path)
    p1, p2 = load_bags(load_site(site))
    expected = np.concatenate([parts["a"], parts["b"], parts["c"]])
    np.testing.assert_array_equal(p1.features.numpy(), expected)
    assert p1.slides.names == ["a.h5", "b.pt", "c.npy"]
    assert p1.slides.index.tolist() == [0, 0, 0, 1, 1, 2]
    np.testing.assert_array_equal(p1.slides.coords[:3].numpy(), [[0, 0], [256, 0], [0, 256]])
    assert torch.isnan(p1.slides.coords[3:]).all()
    assert [p1.slides.has_coords(s) for s in range(3)] == [True, False, False]
    assert p1.slides.rows(1).tolist() == [3, 4]
    # A patient with one file is one slide without coordinates, as before.
    assert p2.slides.names == ["p2.pt"] and p2.slides.index.tolist() == [0] * 4
    assert p2.slides.coords is None and p2.scales is None
    again = load_bags(load_site(site))[0]
    assert torch.equal(again.features, p1.features) and again.slides.names == p1.slides.names


def test_slides_of_one_patient_must_share_the_feature_dimension(tmp_path: Path) -> None:
    site, _ = _two_slide_site(tmp_path)
    torch.save(torch.from_numpy(_feats(2, 5, dim=D + 1)), site / "features" / "p1" / "b.pt")
    with pytest.raises(FeatureError, match=r"b\.pt: feature dimension 5 differs from 4 of a\.h5") as info:
        load_bags(load_site(site))
    assert "same encoder" in str(info.value)


def test_coordinates_must_match_the_instances(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    _h5(path, _feats(3, 0), np.array([[0, 0], [1, 1]]))
    with pytest.raises(FeatureError, match=r"s\.h5: 'coords' has shape \(2, 2\) .* expected \(3, 2\)"):
        read_slide_file(path)
    _h5(path, _feats(2, 0), np.array([[0.0, np.nan], [1, 1]]))
    with pytest.raises(FeatureError, match="NaN/Inf"):
        read_slide_file(path)
    _h5(path, _feats(2, 0), np.array([[0, 0], [256, 512]]))
    assert read_slide_file(path).coords.tolist() == [[0, 0], [256, 512]]


def test_scales_in_some_slides_only_are_refused(tmp_path: Path) -> None:
    site, parts = _two_slide_site(tmp_path)
    _h5(site / "features" / "p1" / "a.h5", parts["a"], scales=np.array([0, 1, 1]))
    with pytest.raises(FeatureError, match=r"b\.pt: has no scale indices but a\.h5"):
        load_bags(load_site(site))


def test_a_file_and_a_slide_folder_of_one_patient_is_ambiguous(tmp_path: Path) -> None:
    site, _ = _two_slide_site(tmp_path)
    torch.save(torch.zeros(2, D), site / "features" / "p1.pt")
    with pytest.raises(SiteDataError, match=r"both the feature file .*p1\.pt and the slide folder"):
        load_bags(load_site(site))
    report = check_site(site, classes=CLASSES)
    assert not report.ok and any("p1.pt" in e and "keep one" in e for e in report.errors)
    (site / "features" / "p1.pt").unlink()
    for f in (site / "features" / "p1").iterdir():
        f.unlink()
    (site / "features" / "p1" / "notes.txt").write_text("not a slide")
    with pytest.raises(SiteDataError, match=r"p1: slide folder .* holds no feature file"):
        load_bags(load_site(site))


def test_check_site_summarises_slides_and_names_bad_files(tmp_path: Path) -> None:
    site, _ = _two_slide_site(tmp_path)
    report = check_site(site, classes=CLASSES)
    assert report.ok, report.format()
    slides = report.stats["slides"]
    assert (slides["min"], slides["median"], slides["max"], slides["total"]) == (1, 2, 3, 4)
    assert (slides["with_coords"], slides["patients_with_coords"]) == (1, 1)
    assert report.stats["instances"]["max"] == 6
    text = report.format()
    assert "slides/captures per patient: min 1, median 2, max 3" in text
    assert "1 of them with instance coordinates, in 1 patients" in text

    torch.save(torch.zeros(2, D + 2), site / "features" / "p1" / "b.pt")
    (site / "features" / "p1" / "d.hdf5").write_bytes(b"")
    bad = check_site(site, classes=CLASSES)
    assert not bad.ok
    assert any(e.startswith(str(site / "features" / "p1" / "b.pt")) and "same encoder" in e
               for e in bad.errors), bad.errors
    assert any("d.hdf5" in w and "ignored" in w for w in bad.warnings), bad.warnings


def test_slide_index_and_coordinates_never_enter_a_batch() -> None:
    # What a model (and so a model update or a federated message) can see of a bag.
    assert {f.name for f in dataclasses.fields(BagBatch)} == {
        "x", "mask", "y", "y_fine", "scales", "patient_ids"
    }


def test_folders_are_scales_when_named_as_magnifications() -> None:
    assert image_place("a.png") == ImagePlace(".", None)
    assert image_place("40X/a.png") == ImagePlace(".", "40X")
    assert image_place("scan1/a.png") == image_place("scan1/x/a.png") == ImagePlace("scan1", None)
    assert image_place("scan1/2.5x/a.png") == ImagePlace("scan1", "2.5x")
    assert image_place("low/a.png") == ImagePlace("low", None)  # not a magnification: a capture
    assert image_place("low/a.png", ["low", "high"]) == ImagePlace(".", "low")
    assert image_layout_problem(Path("p"), ["scan1/40X/a.png", "scan2/a.png"]) is None
    problem = image_layout_problem(Path("images/p"), ["40X/a.png", "scan1/b.png"])
    assert problem and "images/p" in problem and "['scan1']" in problem and "['40X']" in problem


def _capture_site(root: Path, plan: dict[str, list[str]]) -> Path:
    """Real H&E/IHC crops at the relative paths of ``plan`` (patient -> image paths)."""
    tissue = [read_image(DATA / f"{n}.png") for n in ("ihc", "he_tia", "he_stardist")]
    site = root / "site"
    for pid, paths in plan.items():
        for i, rel in enumerate(paths):
            target = site / "images" / pid / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(tissue[i % 3][i * 30:i * 30 + 48, :48]).save(target)
    _csv(site, {pid: ("benign", "malignant")[k % 2] for k, pid in enumerate(plan)})
    return site


def test_image_captures_become_slides_not_scales(tmp_path: Path) -> None:
    site = _capture_site(tmp_path, {
        "p1": ["scanA/t0.png", "scanA/t1.png", "scanB/t0.png"],
        "p2": ["t0.png", "t1.png"],
    })
    result = extract_site_features(site, ["p1", "p2"], get_encoder("pixels:4"))
    assert result.scale_names == ()  # two capture folders are not two scales
    p1, p2 = load_bags(load_site(site), feature_dir=result.feature_dir)
    assert p1.slides.names == ["scanA", "scanB"] and p1.slides.index.tolist() == [0, 0, 1]
    assert p2.slides.names == ["."] and p1.scales is None
    report = check_site(site, classes=CLASSES)
    assert report.ok and report.stats["slides"]["max"] == 2, report.format()


def test_cached_rows_become_captures_or_with_tile_positions_images(tmp_path: Path) -> None:
    # A feature-cache style file: the image of each row, and (tiled) each row's position.
    site = tmp_path / "site"
    _csv(site, {"p1": "benign", "p2": "malignant"})
    rows = ["scanA/a.png", "scanA/a.png", "scanA/b.png", "scanB/c.png", "scanB/c.png"]
    coords = torch.tensor([[0, 0], [48, 0], [0, 0], [0, 0], [0, 48]])
    (site / "features").mkdir()
    torch.save({"features": torch.zeros(5, D), "images": rows}, site / "features" / "p1.pt")
    torch.save({"features": torch.zeros(5, D), "images": rows, "coords": coords},
               site / "features" / "p2.pt")
    p1, p2 = load_bags(load_site(site))
    assert p1.slides.names == ["scanA", "scanB"] and p1.slides.index.tolist() == [0, 0, 0, 1, 1]
    # Tile positions are positions in their image: one slide per image.
    assert p2.slides.names == ["scanA/a.png", "scanA/b.png", "scanB/c.png"]
    assert p2.slides.index.tolist() == [0, 0, 1, 2, 2]
    assert all(p2.slides.has_coords(s) for s in range(3))


def test_scale_folders_inside_captures_keep_both(tmp_path: Path) -> None:
    site = _capture_site(tmp_path, {
        "p1": ["scanA/40X/t0.png", "scanA/100X/t0.png", "scanB/40X/t0.png"],
        "p2": ["scanA/100X/t0.png", "scanA/40X/t0.png"],
    })
    result = extract_site_features(site, ["p1", "p2"], get_encoder("pixels:4"))
    assert result.scale_names == ("40X", "100X")
    p1 = load_bags(load_site(site), feature_dir=result.feature_dir)[0]
    # Rows in path order: scanA/100X, scanA/40X, scanB/40X.
    assert p1.scales.tolist() == [1, 0, 0]
    assert p1.slides.names == ["scanA", "scanB"] and p1.slides.index.tolist() == [0, 0, 1]


def test_scale_folders_beside_capture_folders_are_refused(tmp_path: Path) -> None:
    site = _capture_site(tmp_path, {"p1": ["40X/t0.png", "scanA/t0.png"], "p2": ["t0.png"]})
    with pytest.raises(ImageError, match=r"images/p1: folder\(s\) \['scanA'\] sit beside"):
        extract_site_features(site, ["p1", "p2"], get_encoder("pixels:4"))
    report = check_site(site, classes=CLASSES)
    assert not report.ok and any("sit beside magnification folder" in e for e in report.errors)


def test_a_multi_slide_site_sends_the_same_kinds_of_values(tmp_path: Path) -> None:
    from micromil_core.config import DataConfig, TrainConfig
    from micromil_core.federated import wire
    from micromil_core.federated.site_task import (
        ModelSpec,
        SiteSettings,
        describe_site,
        load_runtime,
        train_round,
    )
    from tests.conftest import write_site

    site = write_site(tmp_path / "h1", n_patients=12)
    for pt in sorted((site / "features").glob("*.pt")):  # each patient: two slides
        feats = torch.load(pt, weights_only=True).numpy()
        coords = np.stack([np.arange(len(feats)) * 224, np.zeros(len(feats))], 1)
        _h5(site / "features" / pt.stem / "slide-x.h5", feats[:2], coords[:2])
        torch.save(torch.from_numpy(feats[2:]), site / "features" / pt.stem / "slide-y.pt")
        pt.unlink()
    settings = SiteSettings("h1", site)
    description, counts = describe_site(settings, DataConfig())
    assert counts["num_errors"] == 0 and set(counts) <= wire.ALLOWED_SITE_METRICS
    assert "slide" not in repr(description) + repr(counts)
    spec = ModelSpec("abmil", 6, 2, {})
    runtime = load_runtime(settings, DataConfig(), TrainConfig(epochs=1), CLASSES)
    assert all(b.slides.names == ["slide-x.h5", "slide-y.pt"] for b in runtime.train)
    state, metrics = train_round(runtime, spec, spec.build().state_dict(), TrainConfig(epochs=1),
                                 None, server_round=1, local_epochs=1)
    assert set(metrics) <= wire.ALLOWED_TRAIN_METRICS
    assert set(state) == set(spec.build().state_dict())
