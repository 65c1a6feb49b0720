"""Images -> encoder inputs -> features, in batches: the engine under ``extract.py``.

Decoding (and tiling, cropping) runs in DataLoader worker processes when ``workers > 0``,
one image per item, in order; the encoder runs in the main process on ``batch_size`` views
at a time, across image and patient boundaries, so a GPU sees full batches even when bags
are small. A view is one encoder input: a tile of an image (or the whole image), stain
normalised when the plan says so (``stain.py``), once per crop scale. A whole-slide file
(``wsi.is_slide_file``: ``.svs``, tiled or pyramidal ``.tif``) is read tile by tile through
``wsi.read_slide_tiles`` at level 0, background tiles skipped, each tile's level-0 corner
kept. An image that cannot be read comes back as its error, raised in the main process
after the views already read have been encoded (see ``extract.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from micromil_core.encoders.base import Encoder
from micromil_core.encoders.scales import center_crop
from micromil_core.encoders.stain import StainNormaliser
from micromil_core.encoders.tiling import TileSpec, tile_image
from micromil_core.encoders.wsi import DEFAULT_MIN_TISSUE, is_slide_file, read_slide_tiles
from micromil_core.errors import ConfigError, FeatureError, MicroMILError

log = logging.getLogger(__name__)

__all__ = ["BatchEncoder", "ViewPlan", "amp_context", "file_views", "image_views",
           "iter_image_views"]


@dataclass(frozen=True)
class ViewPlan:
    """How one file becomes encoder inputs: tiles (None = the whole image; slide files are
    always tiled), each tile stain-normalised when ``stain`` is set, then crops.

    ``slide_min_tissue``: a slide tile with a smaller share of tissue pixels is background
    and skipped (``wsi.iter_slide_tiles``); captures are framed on tissue and keep every tile.
    """

    tiles: TileSpec | None = None
    crops: tuple[float, ...] = (1.0,)
    stain: StainNormaliser | None = None
    slide_min_tissue: float = DEFAULT_MIN_TISSUE

    def views(self, image: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """See :func:`image_views`."""
        return image_views(image, self)


def _finish(tiles: list[np.ndarray], coords: np.ndarray, plan: ViewPlan
            ) -> tuple[list[np.ndarray], np.ndarray]:
    """Tiles -> views: stain normalisation (per tile, before cropping), then the crops."""
    if plan.stain is not None:
        tiles = [plan.stain(t) for t in tiles]
    views = [center_crop(t, c) for t in tiles for c in plan.crops]
    return views, np.repeat(coords, len(plan.crops), axis=0)


def image_views(image: np.ndarray, plan: ViewPlan) -> tuple[list[np.ndarray], np.ndarray]:
    """An image's encoder inputs, tile-major with the crops of a tile together.

    Shapes:
        image: (H, W, 3) uint8
        returns: n_tiles * n_crops views (h, w, 3) uint8; coords (n_views, 2) int64, the
        (x, y) top-left pixel of the tile each view comes from ((0, 0) when not tiled)
    """
    if plan.tiles is None:
        tiles, coords = [image], np.zeros((1, 2), dtype=np.int64)
    else:
        tiles, coords = tile_image(image, plan.tiles)
    return _finish(tiles, coords, plan)


def file_views(path: Path, plan: ViewPlan, read: Callable[[Path], np.ndarray]
               ) -> tuple[list[np.ndarray], np.ndarray]:
    """The encoder inputs of one file: a whole-slide file's tissue tiles (level 0, coords
    in level-0 pixels; none when the slide holds no tissue), else ``image_views(read(path))``.

    Raises:
        ConfigError: a slide file with tiling off (``plan.tiles`` None), or tiffslide missing.
        ImageError: an unreadable image or slide (named).
    """
    if not is_slide_file(path):
        return image_views(read(path), plan)
    if plan.tiles is None:
        raise ConfigError(f"{path} is a whole-slide file: it must be tiled; give a tile size "
                          "(e.g. --tile-size 256 or data.tile_size: 256), not 0")
    tiles, coords = read_slide_tiles(path, tile_size=plan.tiles.size,
                                     overlap=plan.tiles.overlap,
                                     min_tissue=plan.slide_min_tissue)
    return _finish(tiles, coords, plan)


# One decoded item: (index, views, coords, error); views/coords are None when error is set.
Item = tuple[int, list[np.ndarray] | None, np.ndarray | None, MicroMILError | None]


class _ImageViews(Dataset):
    """Item ``i``: the views of file ``paths[i]``, or the error that reading it raised."""

    def __init__(self, paths: Sequence[Path], plan: ViewPlan,
                 read: Callable[[Path], np.ndarray]) -> None:
        self.paths, self.plan, self.read = list(paths), plan, read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        try:
            views, coords = file_views(self.paths[i], self.plan, self.read)
        except MicroMILError as exc:
            # Returned, not raised: a worker's exception would reach the user wrapped in
            # DataLoader's traceback text instead of the one-line message it carries.
            return i, None, None, exc
        return i, views, coords, None


def _keep(item: Item) -> Item:
    return item  # DataLoader would otherwise turn the arrays into tensors


def iter_image_views(paths: Sequence[Path], plan: ViewPlan,
                     read: Callable[[Path], np.ndarray], workers: int = 0) -> Iterator[Item]:
    """Decoded views of ``paths`` in order; ``workers`` > 0 decodes in that many processes."""
    dataset = _ImageViews(paths, plan, read)
    if workers == 0 or len(dataset) < 2:
        return (dataset[i] for i in range(len(dataset)))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_keep)
    return iter(loader)


def amp_context(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for the encoder's forward pass: CUDA only (bfloat16 where the GPU
    supports it, else float16); a no-op elsewhere."""
    if not amp or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def check_workers(workers: object) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer >= 0 (0 = decode images in this "
                          f"process), got {workers!r}")
    return workers


class BatchEncoder:
    """Views of many images in, per-image feature rows out, ``batch_size`` views per pass.

    ``add(key, views)`` queues an image's views (encoding every full batch); ``flush()``
    encodes what is left; ``done[key]`` is then the (n_views, D) float32 features of that
    image. ``n_encoded`` counts views encoded so far.
    """

    def __init__(self, encoder: Encoder, batch_size: int, amp: bool = False) -> None:
        self.encoder, self.batch_size = encoder, batch_size
        self.amp = amp
        self.done: dict[int, torch.Tensor] = {}
        self.n_encoded = 0
        self._pending: list[tuple[int, np.ndarray]] = []  # (image key, view)
        self._parts: dict[int, list[torch.Tensor]] = {}
        self._left: dict[int, int] = {}  # views of an image not encoded yet

    def add(self, key: int, views: Sequence[np.ndarray]) -> None:
        if not views:  # nothing to encode (e.g. no tile): no rows for this image
            self.done[key] = torch.zeros((0, self.encoder.dim), dtype=torch.float32)
            return
        self._left[key] = len(views)
        self._parts[key] = []
        self._pending.extend((key, v) for v in views)
        while len(self._pending) >= self.batch_size:
            self._encode(self.batch_size)

    def flush(self) -> None:
        while self._pending:
            self._encode(min(self.batch_size, len(self._pending)))

    def _encode(self, n: int) -> None:
        batch, self._pending = self._pending[:n], self._pending[n:]
        with amp_context(self.encoder.device, self.amp):
            feats = self.encoder.encode([v for _, v in batch])
        if feats.shape != (n, self.encoder.dim):
            raise FeatureError(
                f"encoder {self.encoder.cache_id} returned shape {tuple(feats.shape)} for "
                f"{n} images; expected ({n}, {self.encoder.dim})"
            )
        feats = feats.detach().to("cpu", torch.float32)
        start = 0
        while start < n:  # rows of one image are contiguous in the batch
            key = batch[start][0]
            stop = start
            while stop < n and batch[stop][0] == key:
                stop += 1
            self._parts[key].append(feats[start:stop])
            self._left[key] -= stop - start
            if self._left[key] == 0:
                self.done[key] = torch.cat(self._parts.pop(key))
                del self._left[key]
            start = stop
        self.n_encoded += n
