"""Extraction with stain normalisation and slide files: cache identity, config options shared
by `micromil extract` and `train --encoder`, named errors. Real H&E crops of tests/data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from micromil_core.config import DataConfig, build_config
from micromil_core.encoders import extract_site_features, get_encoder
from micromil_core.encoders.stain import StainNormaliser
from micromil_core.encoders.tiling import TileSpec, resolve_tiles
from micromil_core.errors import ConfigError, ImageError
from micromil_core.training.loading import feature_dir_for

pytest.importorskip("torchstain", reason="stain normalisation needs `pip install torchstain`")

DATA = Path(__file__).resolve().parents[3] / "data"
REF = DATA / "he_tia.png"


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    for pid, name in (("a", "he_stardist.png"), ("b", "he_tia.png")):
        (tmp_path / "images" / pid).mkdir(parents=True)
        shutil.copy(DATA / name, tmp_path / "images" / pid / name)
    return tmp_path


def _features(folder: Path, pid: str) -> torch.Tensor:
    return torch.load(folder / f"{pid}.pt", weights_only=True)["features"]


def test_stain_settings_are_part_of_the_cache_identity(site: Path) -> None:
    enc = get_encoder("histo-texture")
    plain = extract_site_features(site, ["a", "b"], enc).feature_dir
    norm = StainNormaliser.from_spec(f"macenko:{REF}")
    macenko = extract_site_features(site, ["a", "b"], enc, stain_normalise=f"macenko:{REF}")
    other_ref = extract_site_features(site, ["a", "b"], enc,
                                      stain_normalise=f"macenko:{DATA / 'he_stardist.png'}")
    reinhard = extract_site_features(site, ["a", "b"], enc, stain_normalise=f"reinhard:{REF}")
    dirs = {plain, macenko.feature_dir, other_ref.feature_dir, reinhard.feature_dir}
    assert len(dirs) == 4  # never mixed
    assert macenko.feature_dir.name.endswith(norm.cache_tag)
    manifest = json.loads((macenko.feature_dir / "manifest.json").read_text())
    assert manifest["stain_normalisation"]["reference_sha256"] == norm.reference_sha256
    assert manifest["encoder_identity"]["stain_normalisation"] == norm.identity()
    assert "stain_normalisation" not in json.loads((plain / "manifest.json").read_text())
    assert not torch.allclose(_features(plain, "a"), _features(macenko.feature_dir, "a"))
    # "none" and "" mean off: the plain cache, reused.
    again = extract_site_features(site, ["a", "b"], enc, stain_normalise="none")
    assert again.feature_dir == plain and again.n_reused == 2


def test_stain_normalisation_in_worker_processes_matches(site: Path, tmp_path: Path) -> None:
    enc = get_encoder("histo-texture")
    one = extract_site_features(site, ["a", "b"], enc, stain_normalise=f"reinhard:{REF}",
                                tile_size=64)
    copy = tmp_path / "copy"
    shutil.copytree(site / "images", copy / "images")
    two = extract_site_features(copy, ["a", "b"], enc, stain_normalise=f"reinhard:{REF}",
                                tile_size=64, workers=2)
    for pid in ("a", "b"):
        torch.testing.assert_close(_features(one.feature_dir, pid),
                                   _features(two.feature_dir, pid))


def test_bad_stain_spec_is_refused_before_anything_is_written(site: Path) -> None:
    with pytest.raises(ConfigError, match="unknown stain normalisation method 'vahadane'"):
        extract_site_features(site, ["a"], get_encoder("histo-texture"),
                              stain_normalise=f"vahadane:{REF}")
    with pytest.raises(ConfigError, match="does not exist"):
        extract_site_features(site, ["a"], get_encoder("histo-texture"),
                              stain_normalise="macenko:/nowhere/ref.png")
    assert not (site / "cache").exists()


def test_train_builds_the_cache_extract_builds(site: Path) -> None:
    cfg = build_config({"data": {"encoder": "histo-texture", "tile_size": 96,
                                 "tile_overlap": 16, "stain_normalise": f"macenko:{REF}"}}).data
    by_train = feature_dir_for(site, ["a", "b"], cfg, torch.device("cpu"))
    by_extract = extract_site_features(site, ["a", "b"], get_encoder("histo-texture"),
                                       tile_size=96, tile_overlap=16,
                                       stain_normalise=f"macenko:{REF}")
    assert by_extract.feature_dir == by_train and by_extract.n_reused == 2
    assert by_train.name.endswith("-tile96o16-" + StainNormaliser.from_spec(
        f"macenko:{REF}").cache_tag)


@pytest.mark.parametrize("values, needle", [
    ({"tile_size": 4}, "data.tile_size=4"),
    ({"tile_size": 64, "tile_overlap": 64}, "data.tile_overlap=64"),
    ({"tile_overlap": -1}, "data.tile_overlap=-1"),
    ({"workers": -2}, "data.workers=-2"),
    ({"stain_normalise": "macenko"}, "'<method>:<reference image>'"),
    ({"stain_normalise": "vahadane:/r.png"}, "macenko, reinhard"),
])
def test_data_config_refuses_bad_extraction_settings(values: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        build_config({"data": values})


def test_data_config_defaults_keep_old_behaviour() -> None:
    opts = DataConfig().extraction_options()
    assert opts["tile_size"] is None and opts["stain_normalise"] is None
    assert opts["workers"] == 0 and opts["amp"] is False


def test_slide_tiling_resolution(tmp_path: Path) -> None:
    slide = tmp_path / "x.svs"
    assert resolve_tiles(None, None, 0) is None
    assert resolve_tiles(None, None, 0, slide) == TileSpec(256)  # weight-free encoder
    assert resolve_tiles(224, None, 0, slide) == TileSpec(224)  # a model's input size
    assert resolve_tiles(None, 512, 64, slide) == TileSpec(512, 64)
    with pytest.raises(ConfigError, match="whole-slide file and must be tiled"):
        resolve_tiles(224, 0, 0, slide)


def test_slide_without_tissue_is_named(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("tiffslide")
    folder = tmp_path / "images" / "glass"
    folder.mkdir(parents=True)
    grey = np.full((600, 600, 3), 235, np.uint8)  # a slide of bare glass
    tifffile.imwrite(folder / "empty.tif", grey, tile=(256, 256), photometric="rgb")
    with pytest.raises(ImageError, match="no tissue tile"):
        extract_site_features(tmp_path, ["glass"], get_encoder("histo-texture"))
