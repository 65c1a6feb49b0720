"""Stain normalisation (Macenko, Reinhard through torchstain) on the real H&E crops of
tests/data: round trips, shifted tiles brought back, named errors, background tiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from micromil_core.encoders import read_image
from micromil_core.encoders.stain import (
    METHODS,
    StainNormaliser,
    hed_shift,
    parse_stain_spec,
    tissue_fraction,
    tissue_mask,
)
from micromil_core.errors import ConfigError

pytest.importorskip("torchstain", reason="stain normalisation needs `pip install torchstain`")

DATA = Path(__file__).resolve().parents[3] / "data"
REFERENCE = DATA / "he_tia.png"
# Other sites' staining and scanners (see stain.hed_shift): strong H / pale E; washed out
# and brighter; stain vectors rotated with a darker lamp.
SHIFTS = {
    "strong-h": {"scale": (1.35, 0.8)},
    "washed": {"scale": (0.7, 0.75), "brightness": 1.06},
    "rotated": {"scale": (1.0, 1.2), "rotate_deg": (12.0, -10.0), "brightness": 0.92},
}


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return read_image(DATA / "he_stardist.png")  # (160, 160, 3), another H&E image


@pytest.fixture(scope="module", params=METHODS)
def norm(request: pytest.FixtureRequest) -> StainNormaliser:
    return StainNormaliser.from_spec(f"{request.param}:{REFERENCE}")


def _mean_od(image: np.ndarray) -> np.ndarray:
    """Mean optical density per R, G, B over tissue pixels: the image's stain colour."""
    od = -np.log((image.astype(np.float64) + 1.0) / 256.0)
    return od[tissue_mask(image)].mean(axis=0)  # (3,)


def test_reference_normalised_to_itself_changes_little(norm: StainNormaliser) -> None:
    ref = read_image(REFERENCE)
    out = norm(ref)
    assert out.dtype == np.uint8 and out.shape == ref.shape
    # Grey levels: Macenko recomposes every pixel (rounding, 1st/99th percentile clipping);
    # a different H&E image differs from the reference by more than 20 on average.
    assert np.abs(out.astype(int) - ref).mean() < 4.0
    assert np.abs(_mean_od(out) - _mean_od(ref)).max() < 0.05
    assert norm.passed_through == 0


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_shifted_tile_moves_back_towards_the_unshifted_one(
    norm: StainNormaliser, tile: np.ndarray, shift: str
) -> None:
    shifted = hed_shift(tile, **SHIFTS[shift])
    before = np.linalg.norm(_mean_od(shifted) - _mean_od(tile))
    after = np.linalg.norm(_mean_od(norm(shifted)) - _mean_od(norm(tile)))
    assert before > 0.05, "the simulated site must actually change the colours"
    assert after < 0.5 * before, (shift, before, after)


def test_normalised_tile_takes_the_reference_colour(norm: StainNormaliser,
                                                    tile: np.ndarray) -> None:
    ref = _mean_od(read_image(REFERENCE))
    assert np.linalg.norm(_mean_od(norm(tile)) - ref) < np.linalg.norm(_mean_od(tile) - ref)


def test_input_is_not_modified(norm: StainNormaliser, tile: np.ndarray) -> None:
    copy = tile.copy()
    out = norm(tile)
    np.testing.assert_array_equal(tile, copy)
    assert out is not tile


def test_background_tiles_pass_through_unchanged(norm: StainNormaliser) -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 3, (96, 96, 3)), 0, 255).astype(np.uint8)
    speck = glass.copy()
    speck[:6, :6] = (120, 40, 110)  # 0.4 % tissue: below min_tissue (10 %)
    before = norm.passed_through
    for image in (glass, speck, np.full((32, 32, 3), 255, np.uint8)):
        np.testing.assert_array_equal(norm(image), image)
    assert norm.passed_through == before + 3
    assert tissue_fraction(glass) < 0.01 and 0 < tissue_fraction(speck) < 0.1


def test_tissue_mask_ignores_glass_at_any_brightness() -> None:
    colours = {
        "bright glass": (243, 241, 242), "dark glass (dim lamp)": (212, 214, 213),
        "black": (5, 5, 5), "pale eosin": (236, 200, 222), "nucleus": (70, 45, 120),
    }
    image = np.array([[c for c in colours.values()]], np.uint8)  # (1, 5, 3)
    assert tissue_mask(image)[0].tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("colour", [(0, 0, 0), (200, 90, 170), (60, 20, 90)])
def test_flat_tissue_coloured_tiles_do_not_crash(norm: StainNormaliser, colour) -> None:
    image = np.empty((48, 64, 3), np.uint8)
    image[:] = colour
    out = norm(image)
    assert out.dtype == np.uint8 and out.shape == image.shape


def test_identity_names_method_and_reference_bytes(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere.png"
    shutil.copy(REFERENCE, copy)
    other = tmp_path / "other.png"
    Image.fromarray(read_image(DATA / "he_stardist.png")).save(other)
    ids = {
        "mac": StainNormaliser("macenko", REFERENCE).identity(),
        "mac_copy": StainNormaliser("macenko", copy).identity(),
        "rein": StainNormaliser("reinhard", REFERENCE).identity(),
        "mac_other": StainNormaliser("macenko", other).identity(),
    }
    assert ids["mac"] == ids["mac_copy"]  # same bytes elsewhere: same features
    assert ids["mac"] != ids["rein"] and ids["mac"] != ids["mac_other"]
    assert ids["mac"]["method"] == "macenko" and len(ids["mac"]["reference_sha256"]) == 64
    json.dumps(ids)
    assert StainNormaliser("macenko", REFERENCE).cache_tag.startswith("macenko-")


def test_parse_spec_none_means_no_normalisation() -> None:
    for spec in (None, "", "none", " None "):
        assert parse_stain_spec(spec) is None
    assert parse_stain_spec(f"Reinhard:{REFERENCE}").method == "reinhard"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("vahadane:{ref}", "unknown stain normalisation method 'vahadane'"),
        ("macenko", "needs a method and a reference image"),
        ("macenko:", "needs a method and a reference image"),
        ("macenko:/no/such/ref.png", "/no/such/ref.png does not exist"),
    ],
)
def test_bad_specs_are_named(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        StainNormaliser.from_spec(spec.format(ref=REFERENCE))
    assert needle in str(err.value)
    if "unknown" in needle:
        assert "macenko" in str(err.value) and "reinhard" in str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_reference_with_too_little_tissue_is_refused(tmp_path: Path, method: str) -> None:
    page = np.full((200, 200, 3), 238, np.uint8)
    page[:20, :20] = read_image(REFERENCE)[:20, :20]  # 1 % tissue in a white field
    path = tmp_path / "mostly_white.png"
    Image.fromarray(page).save(path)
    with pytest.raises(ConfigError) as err:
        StainNormaliser(method, path)
    message = str(err.value)
    assert str(path) in message and "tissue" in message and "Choose a crop" in message


def test_unreadable_reference_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="broken.png"):
        StainNormaliser("reinhard", path)


def test_bad_input_array_is_named(norm: StainNormaliser) -> None:
    with pytest.raises(ConfigError, match=r"\(H, W, 3\) uint8"):
        norm(np.zeros((8, 8), np.uint8))


def test_hed_shift_identity_and_direction(tile: np.ndarray) -> None:
    np.testing.assert_array_equal(hed_shift(tile), tile)
    brighter = hed_shift(tile, brightness=1.1)
    assert brighter.astype(int).mean() > tile.astype(int).mean() + 5
    more_h = hed_shift(tile, scale=(1.5, 1.0))
    # More haematoxylin absorbs more red light than green: the red channel drops most.
    drop = tile.astype(float).mean(axis=(0, 1)) - more_h.astype(float).mean(axis=(0, 1))
    assert drop[0] > drop[1] > 0
