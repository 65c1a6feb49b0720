"""Whole-slide tiling with tiffslide: the real CMU-1 crop of tests/data (an Aperio .svs),
a pyramidal TIFF written here, named errors, and one slide's tiles through histo-texture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from micromil_core.encoders import get_encoder
from micromil_core.encoders.handcrafted import HISTO_TEXTURE_DIM, HistoTextureEncoder
from micromil_core.encoders.stain import tissue_fraction
from micromil_core.encoders.wsi import (
    grid_positions,
    is_slide_file,
    iter_slide_tiles,
    read_slide_tiles,
    slide_info,
    tile_array,
)
from micromil_core.errors import ConfigError, ImageError

tifffile = pytest.importorskip("tifffile", reason="slides need `pip install tiffslide`")
pytest.importorskip("tiffslide", reason="slides need `pip install tiffslide`")

CMU = Path(__file__).resolve().parents[3] / "data" / "cmu_small_region.svs"
CMU_W, CMU_H = 2220, 2967  # width x height of its only level


@pytest.fixture(scope="module")
def cmu_pixels() -> np.ndarray:
    """The level-0 pixels as tifffile decodes them, independently of tiffslide."""
    with tifffile.TiffFile(CMU) as tif:
        return tif.pages[0].asarray()  # (H, W, 3)


def test_cmu_crop_info() -> None:
    info = slide_info(CMU)
    assert info.dimensions == (CMU_W, CMU_H) and info.level_count == 1
    assert info.mpp == pytest.approx(0.499)
    assert is_slide_file(CMU)


@pytest.mark.parametrize("size, overlap, nx, ny", [(512, 0, 4, 5), (512, 128, 5, 7),
                                                     (1000, 0, 2, 2)])
def test_cmu_grid_counts_and_coords(size: int, overlap: int, nx: int, ny: int,
                                    cmu_pixels: np.ndarray) -> None:
    tiles, coords = read_slide_tiles(CMU, tile_size=size, overlap=overlap, min_tissue=0)
    step = size - overlap
    expected = [(i * step, j * step) for j in range(ny) for i in range(nx)]
    assert [tuple(c) for c in coords.tolist()] == expected  # row by row, level-0 pixels
    assert all(t.shape == (size, size, 3) and t.dtype == np.uint8 for t in tiles)
    for k in (0, len(tiles) // 2, len(tiles) - 1):
        x, y = coords[k]
        np.testing.assert_array_equal(tiles[k], cmu_pixels[y:y + size, x:x + size])


def test_cmu_background_tiles_are_skipped(cmu_pixels: np.ndarray) -> None:
    every, all_coords = read_slide_tiles(CMU, tile_size=256, min_tissue=0)
    kept, coords = read_slide_tiles(CMU, tile_size=256, min_tissue=0.25)
    fractions = {tuple(c): tissue_fraction(t) for t, c in zip(every, all_coords.tolist(), strict=True)}
    wanted = {c for c, f in fractions.items() if f >= 0.25}
    assert {tuple(c) for c in coords.tolist()} == wanted  # decided on the tile's own pixels
    assert 10 < len(kept) < len(every) - 10  # the crop is about one third tissue
    assert min(tissue_fraction(t) for t in kept) >= 0.25
    assert min(fractions.values()) < 0.01  # there was glass to skip


def test_pyramid_level_coords_are_level0(tmp_path: Path) -> None:
    base = np.full((1024, 1536, 3), 242, np.uint8)
    base[256:768, 512:1024] = (140, 50, 130)  # one block of "tissue"
    half = np.asarray(Image.fromarray(base).resize((768, 512), Image.Resampling.BOX))
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, tile=(256, 256), subifds=1, photometric="rgb", compression="zlib")
        tif.write(half, tile=(256, 256), subfiletype=1, photometric="rgb", compression="zlib")
    info = slide_info(path)
    assert info.level_dimensions == ((1536, 1024), (768, 512)) and is_slide_file(path)
    tiles, coords = read_slide_tiles(path, tile_size=128, level=1, min_tissue=0.5)
    # level-1 tissue covers x 256..512, y 128..384: 2 x 2 whole tiles of 128
    assert coords.tolist() == [[512, 256], [768, 256], [512, 512], [768, 512]]
    for tile, (x, y) in zip(tiles, coords.tolist(), strict=True):
        np.testing.assert_array_equal(tile, half[y // 2:y // 2 + 128, x // 2:x // 2 + 128])
    with pytest.raises(ConfigError, match=r"level 2 does not exist; it has levels 0..1"):
        list(iter_slide_tiles(path, level=2))


def test_plain_images_are_not_slides(tmp_path: Path) -> None:
    striped = tmp_path / "capture.tif"
    tifffile.imwrite(striped, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    png = tmp_path / "capture.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    assert not is_slide_file(striped) and not is_slide_file(png)
    assert not is_slide_file(tmp_path / "missing.tif")


def test_grid_positions_edges() -> None:
    assert grid_positions(100, 60, 64) == [(0, 0, 64, 60)]  # short axis: one clipped tile
    assert grid_positions(40, 30, 64) == [(0, 0, 40, 30)]
    assert [p[0] for p in grid_positions(300, 64, 100, 50)] == [0, 50, 100, 150, 200]
    image = np.full((100, 130, 3), 245, np.uint8)  # glass
    image[:, 64:] = (150, 60, 140)
    tiles = list(tile_array(image, tile_size=64, min_tissue=0.5))
    assert [xy for _, xy in tiles] == [(64, 0)]


def test_grey_slide_keeps_no_tile_and_says_why(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "fluorescence.tif"
    grey = np.random.default_rng(0).integers(0, 120, (512, 512), dtype=np.uint8)
    tifffile.imwrite(path, np.stack([grey] * 3, axis=-1), tile=(256, 256), photometric="rgb")
    with caplog.at_level("WARNING"):
        assert read_slide_tiles(path, tile_size=256)[1].shape == (0, 2)
    assert "use min_tissue=0" in caplog.text
    assert len(read_slide_tiles(path, tile_size=256, min_tissue=0)[0]) == 4


@pytest.mark.parametrize("kwargs, needle", [
    ({"tile_size": 4}, "tile_size must be an integer >= 8"),
    ({"tile_size": 64, "overlap": 64}, "overlap must be an integer in [0, tile_size)"),
    ({"min_tissue": 1.5}, "min_tissue must be a fraction"),
])
def test_bad_tiling_settings_are_named(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        list(iter_slide_tiles(CMU, **kwargs))
    assert needle in str(err.value)


def test_missing_and_corrupt_slides_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nowhere.svs does not exist"):
        list(iter_slide_tiles(tmp_path / "nowhere.svs"))
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(ImageError, match=r"cannot read slide .*junk.svs"):
        slide_info(junk)


def test_one_slide_through_histo_texture() -> None:
    tiles, coords = read_slide_tiles(CMU, tile_size=256, min_tissue=0.5)
    encoder = get_encoder("histo-texture")
    feats = encoder.encode(tiles).numpy()
    assert feats.shape == (len(tiles), HISTO_TEXTURE_DIM) and len(tiles) >= 10
    assert np.isfinite(feats).all()
    # The descriptor's own tissue share uses the same glass threshold as the tile filter.
    column = HistoTextureEncoder.feature_names().index("od.tissue_fraction")
    assert feats[:, column].min() >= 0.5 - 1e-6
    assert np.linalg.norm(feats - feats.mean(axis=0), axis=1).min() > 0  # tiles differ
    assert coords.shape == (len(tiles), 2) and len({tuple(c) for c in coords.tolist()}) == len(tiles)
