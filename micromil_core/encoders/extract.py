"""Fill a site's feature cache from its images, reusing what is already up to date.

Cache layout (``feature_cache_dir(site_dir, encoder.cache_id)``)::

    <patient_id>.pt    torch.save of {"features": (N, D) float32 tensor,
                                      "images": [N image paths relative to images/<patient_id>/,
                                                 POSIX separators, row order of features],
                                      "scales": (N,) int64 scale indices (multi-scale only),
                                      "coords": (N, 2) int64 (x, y) tile corners (tiled only),
                                      "encoder": cache_id, "format": 1}
    manifest.json      {"format": 1, "encoder": cache_id, "dim": D,
                        "scales": [scale names, index order], "crop_scales": [...],
                        "encoder_identity": {"name", "weights_sha256", "files", "cache_id",
                                             "feature_cache_id"},
                        "tiles": {"size": T, "overlap": O} (tiled only),
                        "stain_normalisation": StainNormaliser.provenance() (if used),
                        "patients": {<patient_id>: {"fingerprint": sha256 hex,
                                                    "n_images": n, "file": "<patient_id>.pt",
                                                    "n_instances": N (when N != n),
                                                    "scales": [names its rows use]}}}

Tiling (``tiling.py``): a model encoder cuts an image larger than its input into tiles of
its input size by default (``tile_size``), one row per tile, instead of shrinking the
capture; ``histo-texture`` and ``pixels`` encode whole images unless a tile size is given.
Rows are image-major, then tile (row by row), then crop. Tile settings are part of the
cache id. Batching, DataLoader workers and mixed precision: ``pipeline.py``.

Whole-slide files (``.svs``, tiled or pyramidal ``.tif``; ``wsi.py``) among a patient's
images are always tiled: at ``tile_size``, else the encoder's default, else
``wsi.DEFAULT_TILE_SIZE`` (the whole site then uses that tiling); background tiles are
skipped and each row's ``coords`` are level-0 pixels. Stain normalisation (``stain.py``,
``stain_normalise="macenko:REF.png"``) maps every tile (or whole image) before encoding;
its ``cache_tag`` (method + reference SHA-256) is part of the cache id, so features with and
without it, or with another reference, never share a cache.

The fingerprint hashes the cache id and, per image, its relative path, size and mtime_ns,
so a patient is recomputed when an image is added, removed, renamed or rewritten, and
reused without opening a single image otherwise.

Scales (MRAN; docs/multiscale.md; code in ``scales.py``): a scale folder is named as a
magnification (``40X``, ``100x``, ``2.5X``) or is one of ``scale_names``; any other folder
is a capture, which may hold scale folders itself (``images/<patient_id>/<capture>/40X/``);
scale folders beside other folders are refused as ambiguous (``data.layout.image_place``).
A site whose every image lies in a scale folder and that uses at least two scale names is
multi-scale: the scale index of an image is the position of its folder in the site's scale
names, ordered by their leading number when all have one (40X < 100X < 200X < 400X), else
alphabetically. ``crop_scales`` encodes every image once
per crop (1.0 = whole image, 0.5 = central half of each side, resized back to the image
size, i.e. a 2x digital zoom): rows are image-major, scale index = folder index *
len(crop_scales) + crop index. Crop settings are part of the cache id; scale names are not
(a change of names relabels cached rows without re-encoding). Images outside
scale folders keep the single-scale layout: no "scales" anywhere, old caches valid.

Crash safety: every file is written atomically (temporary file + rename), the feature file
before its manifest entry. The manifest is rewritten after each patient (at most every
``_MANIFEST_EVERY_S`` seconds, and always at the end or when an error stops the run), so an
interruption loses at most the patients finished in the last few seconds; their feature
files are then simply recomputed. A manifest entry whose images changed is never trusted.

Patient ids stay on the site: they appear in file names and the local manifest only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.data.layout import (
    IMAGE_EXTENSIONS,
    IMAGES_DIR,
    feature_cache_dir,
    list_patient_images,
)
from micromil_core.encoders.base import Encoder
from micromil_core.encoders.images import read_image
from micromil_core.encoders.pipeline import (
    BatchEncoder,
    ViewPlan,
    check_workers,
    iter_image_views,
)
from micromil_core.encoders.scales import (  # noqa: F401 (re-exported: the public names here)
    _all_scale_names,
    _crop_suffix,
    _relabel,
    _row_scales,
    _scale_folder,
    _site_scale_names,
    center_crop,
    order_scale_names,
    parse_crop_scales,
)
from micromil_core.encoders.stain import StainNormaliser, parse_stain_spec
from micromil_core.encoders.tiling import TileSpec, resolve_tiles
from micromil_core.encoders.wsi import is_slide_file
from micromil_core.errors import ConfigError, FeatureError, ImageError, MicroMILError, SiteDataError
from micromil_core.io import torch_save_atomic, write_json_atomic
from micromil_core.progress import progress

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "MANIFEST_NAME",
    "ExtractResult",
    "center_crop",
    "extract_site_features",
    "order_scale_names",
    "parse_crop_scales",
    "read_encoder_identity",
]

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = 1
# Rewriting a manifest of thousands of patients after every one of them would cost more
# than the features of small bags; a few seconds of lost work on a crash is cheap.
_MANIFEST_EVERY_S = 2.0


@dataclass(frozen=True)
class ExtractResult:
    """What ``extract_site_features`` did.

    Attributes:
        feature_dir: the cache folder holding ``<patient_id>.pt`` and ``manifest.json``.
        n_extracted: patients whose features were computed in this call.
        n_reused: patients whose cached features were up to date.
        scale_names: name of each scale index (``()`` for a single-scale site).
        n_images: images read and encoded in this call.
        n_instances: feature rows (tiles x crops) computed in this call.
        tiles: the tiling used, None when every image was encoded whole.
    """

    feature_dir: Path
    n_extracted: int
    n_reused: int
    scale_names: tuple[str, ...] = ()
    n_images: int = 0
    n_instances: int = 0
    tiles: TileSpec | None = None


def _fingerprint(image_root: Path, images: Sequence[Path], cache_id: str) -> tuple[str, list[str]]:
    """Hash of the image list (relative path, size, mtime_ns) and the encoder id."""
    h = hashlib.sha256(cache_id.encode("utf-8"))
    rel_paths = []
    for path in images:
        rel = path.relative_to(image_root).as_posix()
        try:
            st = path.stat()
        except OSError as exc:  # deleted or made unreadable since it was listed
            raise ImageError(f"cannot stat image {path} ({exc}); restore or remove it") from exc
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        rel_paths.append(rel)
    return h.hexdigest(), rel_paths


def _load_manifest(path: Path, cache_id: str) -> dict[str, dict[str, Any]]:
    """Patient entries of an existing manifest, or {} when it is missing or unusable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT or data.get("encoder") != cache_id:
            log.warning("feature cache manifest %s is for another encoder/format; rebuilding",
                        path)
            return {}
        patients = data["patients"]
        if not isinstance(patients, dict):
            raise TypeError("'patients' is not an object")
        return {str(k): v for k, v in patients.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("feature cache manifest %s is unreadable (%s); recomputing its patients",
                    path, exc)
        return {}


def _check_patient_id(patient_id: str) -> None:
    # The id becomes a file name: a separator or '..' would write outside the cache.
    if (not isinstance(patient_id, str) or not patient_id or patient_id in (".", "..")
            or "/" in patient_id or "\\" in patient_id or "\0" in patient_id):
        raise SiteDataError(
            f"patient id {patient_id!r} cannot be used as a file name; use ids without "
            "path separators in patients.csv"
        )


class _FeatureCache:
    """The cache folder being filled: manifest entries, feature files and when to save.

    ``dirty``: entries changed since the manifest was last written.
    """

    def __init__(self, out_dir: Path, cache_id: str, encoder: Encoder,
                 folder_names: tuple[str, ...], plan: ViewPlan) -> None:
        self.out_dir, self.cache_id, self.dim = out_dir, cache_id, encoder.dim
        self.folder_names, self.crops, self.tiles = folder_names, plan.crops, plan.tiles
        self.identity = {**encoder.identity, "feature_cache_id": cache_id}
        self.stain = plan.stain.provenance() if plan.stain is not None else None
        if plan.stain is not None:
            self.identity["stain_normalisation"] = plan.stain.identity()
        self.names = _all_scale_names(folder_names, plan.crops)
        self.manifest_path = out_dir / MANIFEST_NAME
        self.entries = _load_manifest(self.manifest_path, cache_id)
        self.dirty = False
        self.last_write = time.monotonic()

    def write_manifest(self) -> None:
        write_json_atomic(self.manifest_path, {
            "format": CACHE_FORMAT, "encoder": self.cache_id, "dim": self.dim,
            "scales": list(self.names), "crop_scales": list(self.crops),
            "encoder_identity": self.identity,
            **({"tiles": {"size": self.tiles.size, "overlap": self.tiles.overlap}}
               if self.tiles else {}),
            **({"stain_normalisation": self.stain} if self.stain else {}),
            "patients": self.entries,
        })

    def save(self, target: Path, features: torch.Tensor, rows: list[str],
             coords: torch.Tensor | None = None) -> None:
        payload = {"features": features, "images": rows, "encoder": self.cache_id,
                   "format": CACHE_FORMAT}
        if self.names:  # single-scale files stay exactly as before
            payload["scales"] = _row_scales(rows, self.folder_names, len(self.crops))
        if coords is not None:  # tiled: each row's tile position, as TRIDENT/CLAM "coords"
            payload["coords"] = coords
        torch_save_atomic(payload, target)

    def reuse(self, pid: str, fingerprint: str) -> bool:
        """Whether ``pid``'s cached features are up to date (relabelled if only the scale
        names changed); False when they must be computed."""
        entry = self.entries.get(pid)
        target = self.out_dir / f"{pid}.pt"
        if entry is None or entry.get("fingerprint") != fingerprint or not target.is_file():
            return False
        if entry.get("scales", []) == list(self.names):
            return True
        if not _relabel(target, self.save):
            return False
        # Same images, other scale names (e.g. a magnification added elsewhere at the
        # site): the cached rows were relabelled without reading images.
        entry.pop("scales", None)
        if self.names:
            entry["scales"] = list(self.names)
        self.dirty = True
        return True

    def store(self, pid: str, fingerprint: str, features: torch.Tensor, rows: list[str],
              n_images: int, coords: torch.Tensor | None = None) -> None:
        """Save ``pid``'s features (``rows``: the image of each row; each image's tiles,
        each tile's crops in order) and its entry; the manifest follows at most every
        ``_MANIFEST_EVERY_S`` seconds."""
        target = self.out_dir / f"{pid}.pt"
        self.save(target, features, rows, coords)
        self.entries[pid] = {"fingerprint": fingerprint, "n_images": n_images,
                             "file": target.name}
        if len(rows) != n_images:
            self.entries[pid]["n_instances"] = len(rows)
        if self.names:
            self.entries[pid]["scales"] = list(self.names)
        self.dirty = True
        if time.monotonic() - self.last_write >= _MANIFEST_EVERY_S:
            self.write_manifest()
            self.dirty, self.last_write = False, time.monotonic()


def _list_images(site: Path, patient_ids: Sequence[str]) -> dict[str, list[Path]]:
    """Every patient's image and slide paths, sorted; each patient must have at least one."""
    listing = {}
    for pid in patient_ids:
        listing[pid] = sorted(list_patient_images(site, pid))
        if not listing[pid]:
            raise ImageError(
                f"patient {pid!r} has no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                f"{site / IMAGES_DIR / pid}; add its images there or remove the patient "
                "from patients.csv"
            )
    return listing


@dataclass
class _Todo:
    """A patient whose features must be computed: its images and their fingerprint."""

    pid: str
    fingerprint: str
    images: list[Path]
    rel_paths: list[str]


class _Run:
    """One extraction pass over the patients to compute: images are decoded in order,
    encoded in batches, and each patient stored as soon as all its images are encoded."""

    def __init__(self, cache: _FeatureCache, todo: list[_Todo], plan: ViewPlan,
                 coder: BatchEncoder, site: Path) -> None:
        self.cache, self.todo, self.plan, self.coder, self.site = cache, todo, plan, coder, site
        self.coords: dict[int, np.ndarray] = {}
        self.next, self.first = 0, 0  # next patient to store, index of its first image
        self.n_stored = 0

    def store_ready(self) -> None:
        """Store every patient, in order, whose images are all encoded."""
        while self.next < len(self.todo):
            t = self.todo[self.next]
            idx = range(self.first, self.first + len(t.images))
            if not all(i in self.coder.done for i in idx):
                return
            parts = [self.coder.done.pop(i) for i in idx]
            features = torch.cat(parts).contiguous()  # (N, D), N = sum of views per image
            if not len(features):  # e.g. slides whose every tile is background
                raise ImageError(
                    f"{self.site / IMAGES_DIR / t.pid}: no tissue tile in this patient's "
                    "slides, so it has no instance; check the files or remove the patient"
                )
            if not torch.isfinite(features).all():
                raise FeatureError(
                    f"encoder {self.cache.cache_id} produced NaN/inf features for the images "
                    f"in {self.site / IMAGES_DIR / t.pid}; check the model file or use "
                    "another encoder"
                )
            rows = [rel for rel, f in zip(t.rel_paths, parts, strict=True) for _ in range(len(f))]
            xy = np.concatenate([self.coords.pop(i) for i in idx])
            coords = torch.from_numpy(xy) if self.plan.tiles is not None else None
            self.cache.store(t.pid, t.fingerprint, features, rows, len(t.images), coords)
            self.next, self.first = self.next + 1, self.first + len(t.images)
            self.n_stored += 1

    def run(self, workers: int, show: bool) -> None:
        paths = [p for t in self.todo for p in t.images]
        # read_image looked up here, at call time: a test may replace it in this module.
        items = iter_image_views(paths, self.plan, read_image, workers)
        bar = progress(items, "extracting features", "img", show, total=len(paths))
        try:
            for i, views, xy, error in bar:
                if error is not None:
                    raise error
                self.coords[i] = xy
                self.coder.add(i, views)
                self.store_ready()
            self.coder.flush()
            self.store_ready()
        except MicroMILError:
            # Patients whose images were all read keep their work (a bad image later on
            # should not cost the features of everyone before it).
            with contextlib.suppress(MicroMILError):
                self.coder.flush()
                self.store_ready()
            raise
        finally:
            if hasattr(bar, "close"):
                bar.close()


def _check_settings(site_dir: str | os.PathLike, patient_ids: Sequence[str], batch_size: int,
                    workers: int) -> Path:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_workers(workers)
    for pid in patient_ids:
        _check_patient_id(pid)
    return Path(site_dir)


def _plan_patients(site: Path, patient_ids: Sequence[str], listing: dict[str, list[Path]],
                   cache: _FeatureCache) -> tuple[list[_Todo], int]:
    """Patients to compute (fingerprint changed or no cache) and the number reused."""
    todo, n_reused = [], 0
    for pid in patient_ids:
        fingerprint, rel_paths = _fingerprint(site / IMAGES_DIR / pid, listing[pid],
                                              cache.cache_id)
        if cache.reuse(pid, fingerprint):
            n_reused += 1
        else:
            todo.append(_Todo(pid, fingerprint, listing[pid], rel_paths))
    return todo, n_reused


def _cache_id(encoder: Encoder, plan: ViewPlan) -> str:
    # Crop, tile and stain settings change the features: they are part of the cache's identity.
    return (encoder.cache_id + _crop_suffix(plan.crops) + (plan.tiles.suffix if plan.tiles else "")
            + (f"-{plan.stain.cache_tag}" if plan.stain else ""))


def extract_site_features(
    site_dir: str | os.PathLike,
    patient_ids: Sequence[str],
    encoder: Encoder,
    batch_size: int = 64,
    progress: bool = False,
    *,
    crop_scales: str | Sequence[float] | None = None,
    scale_names: Sequence[str] | None = None,
    tile_size: int | None = None,
    tile_overlap: int = 0,
    workers: int = 0,
    amp: bool = False,
    stain_normalise: str | StainNormaliser | None = None,
) -> ExtractResult:
    """Compute (or reuse) the features of every listed patient's images.

    Args:
        site_dir: a site folder with ``images/<patient_id>/`` (see ``data.layout``).
        patient_ids: patients to extract, usually every row of patients.csv.
        encoder: from ``get_encoder``; already on its device.
        batch_size: views (tiles x crops) encoded at once, across images and patients.
        progress: show a tqdm progress bar over images, with images/s.
        crop_scales: encode every image once per crop scale (``"1.0,0.5"`` or a sequence
            of fractions in (0, 1]); None = the whole image only.
        scale_names: the federation's scale folder names in index order (``40X,100X``);
            every image must lie in one. None = found here (module docstring).
        tile_size: tile side in pixels, one row per tile, positions kept as ``coords``;
            None = the encoder's default (``tiling.resolve_tiles``); 0 = whole images.
        tile_overlap: pixels shared by neighbouring tiles (< tile size).
        workers: DataLoader processes decoding images (0 = in this process).
        amp: mixed precision (torch.autocast) for a CUDA encoder; ignored on the CPU.
        stain_normalise: ``"macenko:REF.png"``, ``"reinhard:REF.png"`` or a
            ``StainNormaliser``, applied to every tile; None, "" or "none" = off.

    Returns ``ExtractResult``: cache folder, patients extracted/reused, scale names, counts.

    Raises:
        ImageError: a patient has no images or no tissue tile (names the folder), an
            image is unreadable (names the file) or outside the given scale folders.
            Features already cached, and the manifest, stay valid.
        FeatureError: the encoder returned a wrong shape or non-finite values.
        ConfigError: bad ``batch_size``, ``crop_scales``, ``scale_names``, tiling (a slide
            untiled), ``workers`` or ``stain_normalise``. SiteDataError: a bad patient id.
    """
    site = _check_settings(site_dir, patient_ids, batch_size, workers)
    listing = _list_images(site, patient_ids)
    slide = next((p for ps in listing.values() for p in ps if is_slide_file(p)), None)
    plan = ViewPlan(
        resolve_tiles(encoder.default_tile_size, tile_size, tile_overlap, slide),
        parse_crop_scales(crop_scales) if crop_scales is not None else (1.0,),
        stain_normalise if isinstance(stain_normalise, StainNormaliser)
        else parse_stain_spec(stain_normalise),
    )
    if amp and encoder.device.type != "cuda":
        # debug: the CLI tells its user itself; a config reused on a CPU-only site is fine
        log.debug("mixed precision (amp) is for CUDA devices; ignored on %s", encoder.device)
    cache_id = _cache_id(encoder, plan)
    cache = _FeatureCache(feature_cache_dir(site, cache_id), cache_id, encoder,
                          _site_scale_names(site, listing, scale_names), plan)
    run = None
    try:
        todo, n_reused = _plan_patients(site, patient_ids, listing, cache)
        if todo:
            run = _Run(cache, todo, plan, BatchEncoder(encoder, batch_size, amp), site)
            run.run(workers, progress)
        if not cache.manifest_path.is_file():  # an empty patient list still leaves a valid cache
            cache.dirty = True
    finally:
        # Also on errors: patients finished before a bad image keep their cache entries.
        if cache.dirty:
            cache.write_manifest()
    n_extracted = run.n_stored if run else 0
    n_instances = run.coder.n_encoded if run else 0
    log.info("features (%s): %d extracted (%d instances), %d reused%s", cache_id, n_extracted,
             n_instances, n_reused, f"; scales {list(cache.names)}" if cache.names else "")
    return ExtractResult(feature_dir=cache.out_dir, n_extracted=n_extracted, n_reused=n_reused,
                         scale_names=cache.names, n_images=sum(len(t.images) for t in todo),
                         n_instances=n_instances, tiles=plan.tiles)


def read_encoder_identity(feature_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The encoder identity a feature cache's manifest records (``Encoder.identity`` plus
    ``feature_cache_id``: crop and tile settings included), None for precomputed features
    or a cache written before identities were recorded."""
    path = Path(feature_dir) / MANIFEST_NAME
    try:
        identity = json.loads(path.read_text(encoding="utf-8")).get("encoder_identity")
    except (OSError, ValueError, AttributeError):
        return None
    return identity if isinstance(identity, dict) else None
