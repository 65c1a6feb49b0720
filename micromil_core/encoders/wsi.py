"""Whole-slide images (.svs, pyramidal .tif) cut into tissue tiles.

A slide is read with tiffslide (``pip install 'micromil-fl[slides]'``; BSD licence, an
OpenSlide-compatible reader built on tifffile, imagecodecs and zarr, tested with 3.0.1)::

    for tile, (x, y) in iter_slide_tiles("CMU-1.svs", tile_size=256, overlap=32, level=0):
        ...                                  # tile: (256, 256, 3) uint8; x, y: level-0 pixels

Tiling, at the chosen pyramid ``level``: tiles of ``tile_size`` pixels start every
``tile_size - overlap`` pixels from the top-left corner; only whole tiles are cut (the strip
at the right and bottom edges narrower than a step is not covered, as in CLAM), except that
a level smaller than one tile along an axis gives one tile clipped to it. Coordinates are
always level-0 pixels (``x`` right, ``y`` down) of the tile's top-left corner, as in
TRIDENT/CLAM ``coords``.

Background: a tile is kept when at least ``min_tissue`` of its pixels are tissue
(``stain.tissue_mask``: optical density summed over R, G, B above 0.3 and saturation above
0.08, i.e. neither glass nor grey/black; grayscale or fluorescence slides need
``min_tissue=0``, and a slide that keeps no tile is logged as a warning saying so). A
thumbnail mask (longest side at most 2,048 pixels, from the coarsest level that is fine
enough) is checked first, so tiles that are clearly glass are never read; the decision on a
tile that is read is made on its own pixels. ``min_tissue=0`` keeps every tile.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from micromil_core.encoders.stain import tissue_mask
from micromil_core.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

__all__ = [
    "SLIDE_SUFFIXES",
    "SlideInfo",
    "grid_positions",
    "is_slide_file",
    "iter_slide_tiles",
    "read_slide_region",
    "read_slide_tiles",
    "slide_info",
    "tile_array",
]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff")
DEFAULT_TILE_SIZE = 256
DEFAULT_MIN_TISSUE = 0.25
_MASK_MAX_SIDE = 2048


@dataclass(frozen=True)
class SlideInfo:
    """What a slide holds: sizes per level as (width, height), microns per pixel if known."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


def _tiffslide() -> Any:
    try:
        import tiffslide
    except ImportError as exc:
        raise ConfigError(
            "reading .svs / pyramidal .tif slides needs the tiffslide package: "
            "`pip install 'micromil-fl[slides]'` (or `pip install tiffslide`)"
        ) from exc
    return tiffslide


def _open(path: Path) -> Any:
    tiffslide = _tiffslide()
    if not path.is_file():
        raise ImageError(f"slide file {path} does not exist (was it moved or deleted?)")
    slide = None
    try:
        slide = tiffslide.TiffSlide(path)
        _ = slide.level_dimensions, slide.level_downsamples  # parsed lazily: fail here
        return slide
    except Exception as exc:  # tifffile/tiffslide raise many types for bad files
        if slide is not None:
            slide.close()
        raise ImageError(
            f"cannot read slide {path}: {type(exc).__name__}: {exc}; the file is corrupt, "
            "truncated or not a TIFF-based slide (.svs, pyramidal .tif): re-export it or "
            "remove it from the patient's image folder"
        ) from exc


def is_slide_file(path: str | os.PathLike) -> bool:
    """True for ``.svs`` files and for tiled or multi-level (pyramidal) TIFFs.

    A plain striped single-level ``.tif`` (a camera capture) is not a slide: read it whole
    with ``images.read_image``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".svs":
        return True
    if suffix not in (".tif", ".tiff") or not path.is_file():
        return False
    try:
        import tifffile
    except ImportError:
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return bool(series.keyframe.is_tiled) or len(series.levels) > 1
    except Exception:  # unreadable here: let the image reader report it
        return False


def slide_info(path: str | os.PathLike) -> SlideInfo:
    """Levels, sizes and resolution of a slide.

    Raises:
        ImageError: missing or unreadable file. ConfigError: tiffslide not installed.
    """
    path = Path(path)
    slide = _open(path)
    try:
        mpp = slide.properties.get("tiffslide.mpp-x")
        return SlideInfo(
            path=path,
            level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in slide.level_downsamples),
            mpp=float(mpp) if mpp else None,
        )
    finally:
        slide.close()


def _check_tiling(tile_size: int, overlap: int, min_tissue: float) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 8:
        raise ConfigError(f"tile_size must be an integer >= 8 pixels, got {tile_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise ConfigError(
            f"overlap must be an integer in [0, tile_size) = [0, {tile_size}), got {overlap!r}"
        )
    if isinstance(min_tissue, bool) or not 0.0 <= float(min_tissue) <= 1.0:
        raise ConfigError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}")


def grid_positions(width: int, height: int, tile_size: int,
                   overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """Tile rectangles ``(x, y, w, h)`` covering a ``width`` x ``height`` image, row by row.

    Whole tiles every ``tile_size - overlap`` pixels; an axis shorter than ``tile_size`` gets
    one tile clipped to its length.
    """
    _check_tiling(tile_size, overlap, 0.0)
    step = tile_size - overlap

    def starts(length: int) -> list[int]:
        if length <= tile_size:
            return [0]
        return list(range(0, length - tile_size + 1, step))

    tw, th = min(tile_size, width), min(tile_size, height)
    return [(x, y, tw, th) for y in starts(height) for x in starts(width)]


def tile_array(image: np.ndarray, *, tile_size: int = DEFAULT_TILE_SIZE, overlap: int = 0,
               min_tissue: float = 0.0) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """The same tiling for an image already in memory (a large PNG/TIFF capture).

    Shapes:
        image: (H, W, 3) uint8 -> yields ((h, w, 3) uint8 view, (x, y))
    """
    _check_tiling(tile_size, overlap, min_tissue)
    height, width = image.shape[:2]
    for x, y, w, h in grid_positions(width, height, tile_size, overlap):
        tile = image[y:y + h, x:x + w]
        if min_tissue <= 0 or tissue_mask(tile).mean() >= min_tissue:
            yield tile, (x, y)


def _thumbnail_mask(slide: Any) -> tuple[np.ndarray, float]:
    """Tissue mask of the whole slide at low resolution and its downsample from level 0."""
    width, height = slide.dimensions
    wanted = max(width, height) / _MASK_MAX_SIDE
    level = slide.get_best_level_for_downsample(max(wanted, 1.0))
    lw, lh = slide.level_dimensions[level]
    thumb = np.asarray(slide.read_region((0, 0), level, (lw, lh), as_array=True))[..., :3]
    scale = max(lw, lh) / _MASK_MAX_SIDE
    if scale > 1:  # the coarsest level is still large: shrink it for the mask
        size = (max(1, round(lw / scale)), max(1, round(lh / scale)))
        thumb = np.asarray(Image.fromarray(np.ascontiguousarray(thumb)).resize(
            size, Image.Resampling.BOX))
    return tissue_mask(np.ascontiguousarray(thumb, dtype=np.uint8)), width / thumb.shape[1]


def _footprint_fraction(mask: np.ndarray, per_px: float, box: tuple[float, ...]) -> float:
    """Tissue share of the mask under a level-0 box (x0, y0, x1, y1)."""
    x0, y0 = int(box[0] / per_px), int(box[1] / per_px)
    x1, y1 = max(x0 + 1, math.ceil(box[2] / per_px)), max(y0 + 1, math.ceil(box[3] / per_px))
    window = mask[y0:y1, x0:x1]
    return float(window.mean()) if window.size else 0.0


def iter_slide_tiles(
    path: str | os.PathLike,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = 0,
    level: int = 0,
    min_tissue: float = DEFAULT_MIN_TISSUE,
) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """Tissue tiles of a slide at one pyramid level, row by row (see the module docstring).

    Args:
        path: ``.svs`` or pyramidal ``.tif``/``.tiff`` file.
        tile_size: tile side S in pixels of ``level``.
        overlap: pixels shared by neighbouring tiles (step = S - overlap).
        level: pyramid level (0 = full resolution); ``slide_info`` lists them.
        min_tissue: keep tiles with at least this share of tissue pixels (0 keeps all).

    Shapes:
        yields ((S, S, 3) uint8, (x, y) level-0 ints); clipped to the level's size when the
        level is smaller than S along an axis.

    Raises:
        ConfigError: bad tiling settings or level; tiffslide not installed.
        ImageError: missing or unreadable slide (named).
    """
    _check_tiling(tile_size, overlap, min_tissue)
    path = Path(path)
    slide = _open(path)
    try:
        if isinstance(level, bool) or not isinstance(level, int) or not (
                0 <= level < slide.level_count):
            raise ConfigError(
                f"slide {path}: level {level!r} does not exist; it has levels "
                f"0..{slide.level_count - 1} with sizes {list(slide.level_dimensions)}"
            )
        lw, lh = slide.level_dimensions[level]
        down = float(slide.level_downsamples[level])
        mask, per_px = _thumbnail_mask(slide) if min_tissue > 0 else (None, 1.0)
        kept = 0
        for x, y, w, h in grid_positions(lw, lh, tile_size, overlap):
            x0, y0 = round(x * down), round(y * down)
            if mask is not None:
                box = (x0, y0, x0 + w * down, y0 + h * down)
                # Half the threshold: the thumbnail only rules out tiles that are clearly glass.
                if _footprint_fraction(mask, per_px, box) < min_tissue / 2:
                    continue
            tile = slide.read_region((x0, y0), level, (w, h), as_array=True)
            tile = np.ascontiguousarray(np.asarray(tile)[..., :3], dtype=np.uint8)
            if min_tissue > 0 and tissue_mask(tile).mean() < min_tissue:
                continue
            kept += 1
            yield tile, (x0, y0)
        if kept == 0:
            log.warning("slide %s: no tile at level %d has >= %.0f%% stained tissue; for "
                        "grayscale or fluorescence slides use min_tissue=0", path, level,
                        100 * min_tissue)
    finally:
        slide.close()


def read_slide_tiles(path: str | os.PathLike, **tiling: Any) -> tuple[list[np.ndarray], np.ndarray]:
    """All tissue tiles of a slide at once (``iter_slide_tiles`` arguments).

    Shapes:
        returns (n tiles (S, S, 3) uint8, coords (n, 2) int64 level-0 (x, y))
    """
    tiles, coords = [], []
    for tile, xy in iter_slide_tiles(path, **tiling):
        tiles.append(tile)
        coords.append(xy)
    return tiles, np.asarray(coords, dtype=np.int64).reshape(-1, 2)


def read_slide_region(path: str | os.PathLike, x: int, y: int, size: int) -> np.ndarray:
    """One level-0 square of a slide, clipped to the slide (e.g. a tile shown in a gallery).

    Shapes:
        returns (min(size, H - y), min(size, W - x), 3) uint8; (x, y) level-0 pixels

    Raises:
        ImageError: missing or unreadable slide, or (x, y) outside it.
    """
    path = Path(path)
    slide = _open(path)
    try:
        width, height = slide.dimensions
        w, h = min(size, width - x), min(size, height - y)
        if x < 0 or y < 0 or w < 1 or h < 1:
            raise ImageError(f"slide {path}: position ({x}, {y}) lies outside its "
                             f"{width} x {height} level-0 pixels")
        region = slide.read_region((int(x), int(y)), 0, (int(w), int(h)), as_array=True)
        return np.ascontiguousarray(np.asarray(region)[..., :3], dtype=np.uint8)
    finally:
        slide.close()


def slide_thumbnail(path: str | os.PathLike, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A small RGB copy of a slide (from its coarsest fitting level) and its level-0 size.

    Shapes: returns (h, w, 3) uint8 with max(h, w) <= max_side, (width, height)

    Raises:
        ImageError: missing or unreadable slide.
    """
    path = Path(path)
    slide = _open(path)
    try:
        thumb = slide.get_thumbnail((int(max_side), int(max_side)))
        return np.asarray(thumb.convert("RGB")), tuple(int(v) for v in slide.dimensions)
    finally:
        slide.close()
