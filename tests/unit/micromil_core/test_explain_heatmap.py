"""Heatmaps of instance scores at slide coordinates: the grid, the picture, the notes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from micromil_core.data.bag import Slides
from micromil_core.explain_heatmap import (
    HEATMAP_DIR,
    MAX_CELLS,
    NO_COORDS,
    NO_SCORES,
    coordinate_grid,
    heatmap_section,
    thumbnail,
)

DATA = Path(__file__).resolve().parents[2] / "data"


def test_grid_puts_each_score_at_its_patch() -> None:
    # A 3 x 2 tiling with stride 256 (TRIDENT-style top-left corners), one patch missing.
    coords = np.array([[512, 256], [0, 0], [256, 0], [0, 256], [512, 0]])
    grid, extent = coordinate_grid(coords, np.array([5.0, 1.0, 2.0, 4.0, 3.0]))
    expected = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 5.0]])  # row 0 = top of the slide
    np.testing.assert_array_equal(grid, expected)
    assert extent == (0.0, 768.0, 512.0, 0.0)  # left, right, bottom, top


def test_grid_keeps_the_highest_score_where_patches_share_a_cell() -> None:
    # A cell spacing far below the slide's size is binned to at most MAX_CELLS a side.
    coords = np.array([[0, 0], [1, 0], [100_000, 50_000]])
    grid, _ = coordinate_grid(coords, np.array([0.2, 0.9, 0.5]))
    assert max(grid.shape) <= MAX_CELLS
    assert grid[0, 0] == 0.9 and grid[-1, -1] == 0.5
    assert np.isnan(grid).sum() == grid.size - 2


def test_grid_of_a_single_patch() -> None:
    grid, extent = coordinate_grid(np.array([[300, 700]]), np.array([0.4]))
    assert grid.tolist() == [[0.4]] and extent == (300.0, 301.0, 701.0, 700.0)


def _slides(coords_b: bool) -> Slides:
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    coords = torch.full((8, 2), float("nan"))
    coords[:4] = torch.tensor([[0, 0], [224, 0], [0, 224], [224, 224]])
    if coords_b:
        coords[4:7] = torch.tensor([[0, 0], [0, 448], [0, 896]])
    return Slides(["a.h5", "b.h5", "c.pt"], index, coords)


def test_section_draws_one_panel_per_slide_with_coordinates(tmp_path: Path) -> None:
    scores = np.linspace(0.0, 1.0, 8)
    text = heatmap_section(tmp_path, "p1", _slides(coords_b=True), scores, "attention weight")
    png = tmp_path / HEATMAP_DIR / "p1.png"
    assert f'src="{HEATMAP_DIR}/p1.png"' in text and png.is_file()
    assert "No heatmap for c.pt" in text and "a.h5" not in text.split("No heatmap")[1]
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    width, height = Image.open(png).size
    assert f'width="{width}" height="{height}"' in text
    # viridis's yellow (the highest score) and its dark purple (the lowest) are drawn.
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 80)
    purple = (pixels[..., 0] > 50) & (pixels[..., 0] < 90) & (pixels[..., 2] > 70) & (
        pixels[..., 1] < 20)
    assert yellow.sum() > 100 and purple.sum() > 100


def test_a_tiled_image_shows_under_its_heatmap(tmp_path: Path) -> None:
    # A capture tiled into 32-px tiles: its slide is the image, named by its path.
    image_dir = tmp_path / "images" / "p1"
    (image_dir / "scanA").mkdir(parents=True)
    tissue = Image.open(DATA / "he_tia.png").convert("RGB")
    tissue.save(image_dir / "scanA" / "wsi.png")
    coords = torch.tensor([[x, y] for y in range(0, 160, 32) for x in range(0, 160, 32)],
                          dtype=torch.float32)
    slides = Slides(["scanA/wsi.png"], torch.zeros(25, dtype=torch.long), coords)
    scores = np.linspace(0.0, 1.0, 25)
    plain = heatmap_section(tmp_path / "plain", "p1", slides, scores, "attention weight")
    over = heatmap_section(tmp_path / "over", "p1", slides, scores, "attention weight", image_dir)
    assert "grey: no instance there" in plain and "slide image shows through" in over
    a, b = (np.asarray(Image.open(tmp_path / d / HEATMAP_DIR / "p1.png").convert("RGB"), float)
            for d in ("plain", "over"))
    assert a.shape == b.shape
    # The tissue changes the panel's pixels (not only a few edge pixels).
    assert (np.abs(a - b).sum(-1) > 60).mean() > 0.1
    assert thumbnail(image_dir / "scanA" / "missing.png") is None
    assert thumbnail(image_dir / "scanA" / "wsi.png")[1] == tissue.size


def test_section_says_why_there_is_no_heatmap(tmp_path: Path) -> None:
    no_coords = Slides(["a.pt"], torch.zeros(3, dtype=torch.long), None)
    text = heatmap_section(tmp_path, "p1", no_coords, np.ones(3), "attention weight")
    assert "positions on a slide" in text and NO_COORDS.split(":")[0] in text
    assert heatmap_section(tmp_path, "p1", None, np.ones(3), "attention weight").count("No heatmap") == 1
    assert NO_SCORES in heatmap_section(tmp_path, "p1", _slides(True), None, "attention weight")
    assert not (tmp_path / HEATMAP_DIR).exists()  # nothing drawn


def test_a_whole_slide_gets_a_thumbnail_through_the_slide_reader() -> None:
    from micromil_core.explain_heatmap import THUMB_PX, thumbnail

    thumb = thumbnail(DATA / "cmu_small_region.svs")
    assert thumb is not None
    small, full = thumb
    assert full == (2220, 2967)  # level-0 width x height of the CMU-1 crop (tiffslide)
    assert max(small.shape[:2]) <= THUMB_PX and small.shape[2] == 3
    assert small.std() > 5  # tissue, not a blank canvas
