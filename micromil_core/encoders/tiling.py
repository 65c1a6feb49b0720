"""Cutting a capture larger than the encoder's input into tiles (one instance per tile).

A model encoder sees ``input_size`` x ``input_size`` pixels; shrinking a 2000-pixel capture
to that would discard the cellular detail pathology features depend on. Tiles keep the
native resolution, and each tile's top-left corner ``(x, y)`` in the capture's pixels is
kept, as TRIDENT and CLAM keep ``coords`` beside their features, so a heatmap can place
instance scores later.

The grid is the slides' (``wsi.grid_positions``): whole tiles of side ``T`` every
``T - O`` pixels (``O``: overlap) from the top-left corner; the strip at the right and bottom
edges narrower than a step is not covered (as in CLAM); an axis no longer than ``T`` gets one
tile spanning it, so a capture no larger than the tile is encoded whole, exactly as without
tiling. Tiles are not filtered for tissue here: a microscopy capture is framed on tissue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from micromil_core.encoders.wsi import DEFAULT_TILE_SIZE, grid_positions
from micromil_core.errors import ConfigError

__all__ = ["TileSpec", "resolve_tiles", "tile_image"]


@dataclass(frozen=True)
class TileSpec:
    """Tile side and overlap in pixels (``0 <= overlap < size``)."""

    size: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise ConfigError(f"tile size must be an integer >= 8 pixels, got {self.size!r}; "
                              "e.g. --tile-size 224 (0 turns tiling off)")
        if (isinstance(self.overlap, bool) or not isinstance(self.overlap, int)
                or not 0 <= self.overlap < self.size):
            raise ConfigError(f"tile overlap must be an integer in [0, {self.size - 1}] pixels "
                              f"(less than the tile size {self.size}), got {self.overlap!r}")

    @property
    def suffix(self) -> str:
        """Cache-id fragment: tiled features differ from whole-image ones."""
        return f"-tile{self.size}" + (f"o{self.overlap}" if self.overlap else "")


def tile_image(image: np.ndarray, spec: TileSpec) -> tuple[list[np.ndarray], np.ndarray]:
    """Cut one capture into tiles, row by row (y, then x).

    Shapes:
        image: (H, W, 3) uint8
        returns: tiles, each (min(T, H), min(T, W), 3) uint8; coords (n_tiles, 2) int64,
        the (x, y) pixel position of each tile's top-left corner
    """
    h, w = image.shape[:2]
    boxes = grid_positions(w, h, spec.size, spec.overlap)
    tiles = [np.ascontiguousarray(image[y:y + th, x:x + tw]) for x, y, tw, th in boxes]
    coords = np.asarray([(x, y) for x, y, _, _ in boxes], dtype=np.int64).reshape(-1, 2)
    return tiles, coords


def resolve_tiles(default_size: int | None, tile_size: int | None, tile_overlap: int,
                  slide: Path | None = None) -> TileSpec | None:
    """The tiling an extraction uses.

    ``tile_size`` None = ``default_size`` (the encoder's: model encoders their input size,
    weight-free descriptors none, or ``wsi.DEFAULT_TILE_SIZE`` when the site holds a
    whole-slide file such as ``slide``); 0 = none, refused with a slide file (a slide
    cannot be encoded whole).

    Raises:
        ConfigError: overlap without tiling, tiling off with a slide file, bad size/overlap.
    """
    size = default_size if tile_size is None else tile_size
    if slide is not None and not size:
        if tile_size == 0:
            raise ConfigError(f"{slide} is a whole-slide file and must be tiled; drop tile "
                              "size 0 or give one, e.g. --tile-size 256")
        size = DEFAULT_TILE_SIZE
    if not size:
        if tile_overlap:
            raise ConfigError(f"tile overlap {tile_overlap} given without tiling; set a tile "
                              "size too, e.g. --tile-size 224 --tile-overlap 32")
        return None
    return TileSpec(size, tile_overlap)
