"""What the explanation gallery shows for each instance: its image, or its tile of it.

Features extracted here (``encoders/extract.py``) name the image of every row; tiled rows
(large captures, whole-slide files) also carry ``coords``, the tile's top-left corner, and
the cache's manifest records the tile side ``T``. Such a row is shown as its tile,
``image[y:y + T, x:x + T]`` (a slide's region is read through ``encoders.wsi``), not as
the whole capture once per tile. Rows without coordinates show their whole image.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from micromil_core.data.layout import IMAGES_DIR, find_feature_file, list_patient_images

__all__ = ["InstanceImage", "instance_images"]


@dataclass(frozen=True)
class InstanceImage:
    """One instance's picture: a file, and the tile of it when the instance is a tile.

    ``xy``: the tile's top-left corner (level-0 pixels for slides); ``size``: its side.
    """

    path: Path
    xy: tuple[int, int] | None = None
    size: int = 0

    def read(self) -> np.ndarray:
        """The pixels to show. Shapes: (h, w, 3) uint8, at most (size, size, 3) for a tile."""
        from micromil_core.encoders.wsi import is_slide_file, read_slide_region

        if self.xy is None:
            return _whole_image(self.path)
        x, y = self.xy
        if is_slide_file(self.path):
            return read_slide_region(self.path, x, y, self.size)
        return _whole_image(self.path)[y:y + self.size, x:x + self.size]


@functools.lru_cache(maxsize=2)
def _whole_image(path: Path) -> np.ndarray:
    # A gallery shows several tiles of one capture in a row: decode it once.
    from micromil_core.encoders.images import read_image

    return read_image(path)


def _tile_size(feature_dir: Path) -> int:
    """The tile side the cache's manifest records; 0 when it records none."""
    from micromil_core.encoders.extract import MANIFEST_NAME

    try:
        tiles = json.loads((feature_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["tiles"]
        return int(tiles["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _cached_rows(site_dir: Path, patient_id: str, rows: list) -> list[Path] | None:
    """Each row's image file (relative to the site or to images/<patient_id>/), or None
    when one of them is gone."""
    paths = []
    for rel in rows:
        for base in (site_dir, site_dir / IMAGES_DIR / patient_id):
            if (base / str(rel)).is_file():
                paths.append(base / str(rel))
                break
        else:
            return None
    return paths


def instance_images(
    site_dir: Path, feature_dir: Path, patient_id: str, n: int
) -> list[InstanceImage] | None:
    """The picture of each of the patient's ``n`` instances, or None when unknown.

    From the feature cache's rows (``images``, and ``coords`` with the manifest's tile
    size for tiles), else the patient's image files when there are exactly ``n``.
    """
    from micromil_core.encoders.wsi import is_slide_file

    ff = find_feature_file(feature_dir, patient_id)
    if ff is not None and ff.suffix == ".pt":
        obj = torch.load(ff, map_location="cpu", weights_only=True)
        rows = obj.get("images") if isinstance(obj, dict) else None
        if isinstance(rows, list) and len(rows) == n:
            paths = _cached_rows(Path(site_dir), patient_id, rows)
            if paths is None:
                return None
            coords, size = obj.get("coords"), _tile_size(Path(feature_dir))
            if coords is not None and size and tuple(coords.shape) == (n, 2):
                xy = [(int(x), int(y)) for x, y in coords.tolist()]
                return [InstanceImage(p, c, size) for p, c in zip(paths, xy, strict=True)]
            if any(is_slide_file(p) for p in set(paths)):
                return None  # a slide's rows without tile positions: nothing to crop
            return [InstanceImage(p) for p in paths]
    images = list_patient_images(site_dir, patient_id)
    if len(images) != n or any(is_slide_file(p) for p in images):
        return None  # without the cache's rows a slide's tiles cannot be placed
    return [InstanceImage(p) for p in images]
