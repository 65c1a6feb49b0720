"""Fill a site's feature cache from its images, reusing what is already up to date.

Cache layout (``feature_cache_dir(site_dir, encoder.cache_id)``)::

    <patient_id>.pt    torch.save of {"features": (N, D) float32 tensor,
                                      "images": [N image paths relative to images/<patient_id>/,
                                                 POSIX separators, row order of features],
                                      "scales": (N,) int64 scale indices (multi-scale only),
                                      "encoder": cache_id, "format": 1}
    manifest.json      {"format": 1, "encoder": cache_id, "dim": D,
                        "scales": [scale names, index order], "crop_scales": [...],
                        "patients": {<patient_id>: {"fingerprint": sha256 hex,
                                                    "n_images": N, "file": "<patient_id>.pt",
                                                    "scales": [names its rows use]}}}

The fingerprint hashes the cache id and, per image, its relative path, size and mtime_ns,
so a patient is recomputed when an image is added, removed, renamed or rewritten, and
reused without opening a single image otherwise.

Scales (MRAN; docs/multiscale.md): a site whose every image lies in a first-level subfolder
``images/<patient_id>/<scale>/`` (e.g. BreakHis's 40X/100X/200X/400X) and that uses at
least two such names is multi-scale: the scale index of an image is the position of its
folder in the site's scale names, ordered by their leading number when all have one
(40X < 100X < 200X < 400X), else alphabetically. ``crop_scales`` encodes every image once
per crop (1.0 = whole image, 0.5 = central half of each side, resized back to the image
size, i.e. a 2x digital zoom): rows are image-major, scale index = folder index *
len(crop_scales) + crop index. Crop settings are part of the cache id; scale names are not
(a change of names relabels cached rows without re-encoding). Images directly in
``images/<patient_id>/`` keep the single-scale layout: no "scales" anywhere, old caches valid.

Crash safety: every file is written atomically (temporary file + rename), the feature file
before its manifest entry. The manifest is rewritten after each patient (at most every
``_MANIFEST_EVERY_S`` seconds, and always at the end or when an error stops the run), so an
interruption loses at most the patients finished in the last few seconds; their feature
files are then simply recomputed. A manifest entry whose images changed is never trusted.

Patient ids stay on the site: they appear in file names and the local manifest only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from micromil_core.data.layout import (
    IMAGE_EXTENSIONS,
    IMAGES_DIR,
    feature_cache_dir,
    list_patient_images,
)
from micromil_core.encoders.base import Encoder
from micromil_core.encoders.images import read_image
from micromil_core.errors import ConfigError, FeatureError, ImageError, SiteDataError
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
    """

    feature_dir: Path
    n_extracted: int
    n_reused: int
    scale_names: tuple[str, ...] = ()


# --- scales -------------------------------------------------------------------------------

_LEADING_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)")


def order_scale_names(names: Iterable[str]) -> list[str]:
    """Distinct scale folder names in index order.

    By their leading number when every name has one (``40X < 100X < 200X < 400X``: the
    order of magnification users expect, not the string order), else alphabetically.
    """
    unique = set(names)
    numbers = {n: _LEADING_NUMBER.match(n) for n in unique}
    if unique and all(numbers.values()):
        return sorted(unique, key=lambda n: (float(numbers[n].group(1)), n))
    return sorted(unique, key=lambda n: (n.casefold(), n))


def parse_crop_scales(value: str | Sequence[float]) -> tuple[float, ...]:
    """Crop scales from ``"1.0,0.5"`` or a sequence: distinct fractions in (0, 1], in order.

    Raises:
        ConfigError: empty, not numbers, out of (0, 1] or repeated.
    """
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    fix = "give distinct fractions in (0, 1], e.g. --crop-scales 1.0,0.5"
    try:
        crops = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"crop scales {value!r} are not numbers; {fix}") from None
    if not crops or any(not 0.0 < c <= 1.0 for c in crops) or len(set(crops)) != len(crops):
        raise ConfigError(f"crop scales {value!r} are invalid; {fix}")
    return crops


def _crop_suffix(crops: tuple[float, ...]) -> str:
    """Cache-id suffix of a crop setting; empty for the plain whole image (old caches)."""
    return "" if crops == (1.0,) else "-crop" + "_".join(format(c, "g") for c in crops)


def center_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """The central ``fraction`` of each side, resized back to the image size (bilinear).

    Resizing back makes a crop a digital zoom by 1/fraction that every encoder then
    preprocesses exactly like the whole image.

    Shapes: image (H, W, 3) uint8 -> (H, W, 3) uint8
    """
    if fraction == 1.0:
        return image
    h, w = image.shape[:2]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = np.ascontiguousarray(image[top:top + ch, left:left + cw])
    return np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))


def _scale_folder(rel_path: str) -> str | None:
    """The scale folder of an image path relative to images/<pid>/, None when at the top."""
    parts = rel_path.split("/")
    return parts[0] if len(parts) > 1 else None


def _site_scale_names(
    site: Path, listing: dict[str, list[Path]], scale_names: Sequence[str] | None
) -> tuple[str, ...]:
    """The site's folder scale names in index order; ``()`` when it is single-scale."""
    folders = {
        pid: {_scale_folder(p.relative_to(site / IMAGES_DIR / pid).as_posix()) for p in images}
        for pid, images in listing.items()
    }
    found = set().union(*folders.values()) if folders else set()
    if scale_names is not None:
        names = tuple(scale_names)
        if not names or len(set(names)) != len(names) or not all(names):
            raise ConfigError(
                f"scale names {list(names)} must be distinct, non-empty folder names, e.g. "
                "40X,100X,200X,400X"
            )
        for pid, fs in folders.items():
            stray = sorted((f or ".") for f in fs if f not in names)
            if stray:
                raise ImageError(
                    f"{site / IMAGES_DIR / pid}: images in {stray} are not in a scale folder "
                    f"{list(names)}; move them into one of those folders (e.g. "
                    f"{IMAGES_DIR}/{pid}/{names[0]}/) or add the folder to the scale names"
                )
        return names
    named = found - {None}
    if len(named) < 2:
        return ()  # one folder or none: organisation, not scales
    if None in found:
        mixed = sorted(pid for pid, fs in folders.items() if None in fs)
        log.warning(
            "%s: %d patient(s) have images directly in %s/<patient_id>/ besides scale "
            "folders %s; treating the site as single-scale. Move them into a scale folder "
            "to use the scales.", site, len(mixed), IMAGES_DIR, order_scale_names(named),
        )
        return ()
    return tuple(order_scale_names(named))


def _row_scales(rel_paths: Sequence[str], folder_names: tuple[str, ...], n_crops: int
                ) -> torch.Tensor:
    """Scale index of every feature row (rows: each image's crops in order).

    Shapes: rel_paths (N * n_crops,) row-aligned image paths -> (N * n_crops,) int64
    """
    index = {name: i for i, name in enumerate(folder_names)}
    folder = [index[_scale_folder(r)] if folder_names else 0 for r in rel_paths]
    return torch.tensor(
        [f * n_crops + row % n_crops for row, f in enumerate(folder)], dtype=torch.long
    )


def _relabel(target: Path, save: Callable[[Path, torch.Tensor, list[str]], None]) -> bool:
    """Rewrite a cached file's scale indices from its stored rows; False if it is unusable."""
    try:
        cached = torch.load(target, map_location="cpu", weights_only=True)
        save(target, cached["features"], [str(r) for r in cached["images"]])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        log.warning("cannot relabel cached features %s (%s); recomputing them", target, exc)
        return False
    return True


def _all_scale_names(folder_names: tuple[str, ...], crops: tuple[float, ...]) -> tuple[str, ...]:
    """Name of every scale index: folder names, crop names or ``<folder>@<crop>``."""
    if len(crops) == 1:
        return folder_names
    crop_names = [format(c, "g") for c in crops]
    if not folder_names:
        return tuple(f"crop{c}" for c in crop_names)
    return tuple(f"{f}@{c}" for f in folder_names for c in crop_names)


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


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _progress(items: Sequence[str], enabled: bool) -> Iterable[str]:
    return progress(items, "extracting features", "patient", enabled)


class _FeatureCache:
    """The cache folder being filled: manifest entries, feature files and when to save.

    ``dirty``: entries changed since the manifest was last written.
    """

    def __init__(self, out_dir: Path, cache_id: str, dim: int, folder_names: tuple[str, ...],
                 crops: tuple[float, ...]) -> None:
        self.out_dir, self.cache_id, self.dim = out_dir, cache_id, dim
        self.folder_names, self.crops = folder_names, crops
        self.names = _all_scale_names(folder_names, crops)
        self.manifest_path = out_dir / MANIFEST_NAME
        self.entries = _load_manifest(self.manifest_path, cache_id)
        self.dirty = False
        self.last_write = time.monotonic()

    def write_manifest(self) -> None:
        write_json_atomic(self.manifest_path, {
            "format": CACHE_FORMAT, "encoder": self.cache_id, "dim": self.dim,
            "scales": list(self.names), "crop_scales": list(self.crops),
            "patients": self.entries,
        })

    def save(self, target: Path, features: torch.Tensor, rows: list[str]) -> None:
        payload = {"features": features, "images": rows, "encoder": self.cache_id,
                   "format": CACHE_FORMAT}
        if self.names:  # single-scale files stay exactly as before
            payload["scales"] = _row_scales(rows, self.folder_names, len(self.crops))
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

    def store(self, pid: str, fingerprint: str, features: torch.Tensor,
              rel_paths: list[str]) -> None:
        """Save ``pid``'s features (rows: each image's crops in order) and its entry; the
        manifest follows at most every ``_MANIFEST_EVERY_S`` seconds."""
        target = self.out_dir / f"{pid}.pt"
        self.save(target, features, [r for r in rel_paths for _ in self.crops])
        self.entries[pid] = {"fingerprint": fingerprint, "n_images": len(rel_paths),
                             "file": target.name}
        if self.names:
            self.entries[pid]["scales"] = list(self.names)
        self.dirty = True
        if time.monotonic() - self.last_write >= _MANIFEST_EVERY_S:
            self.write_manifest()
            self.dirty, self.last_write = False, time.monotonic()


def _list_images(site: Path, patient_ids: Sequence[str]) -> dict[str, list[Path]]:
    """Every patient's image paths; each patient must have at least one."""
    listing = {}
    for pid in patient_ids:
        listing[pid] = list_patient_images(site, pid)
        if not listing[pid]:
            raise ImageError(
                f"patient {pid!r} has no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                f"{site / IMAGES_DIR / pid}; add its images there or remove the patient "
                "from patients.csv"
            )
    return listing


def _encode_patient(images: Sequence[Path], encoder: Encoder, batch_size: int,
                    folder: Path, crops: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """Features of one patient's images (each once per crop scale), about ``batch_size``
    views encoded at a time.

    Shapes:
        returns (len(images) * len(crops), encoder.dim) float32, image-major
    """
    chunks = []
    for batch in _batches(images, max(1, batch_size // len(crops))):
        views = [center_crop(read_image(p), c) for p in batch for c in crops]
        feats = encoder.encode(views)
        if feats.shape != (len(views), encoder.dim):
            raise FeatureError(
                f"encoder {encoder.cache_id} returned shape {tuple(feats.shape)} for "
                f"{len(views)} images of {folder}; expected ({len(views)}, {encoder.dim})"
            )
        chunks.append(feats.detach().to("cpu", torch.float32))
    features = torch.cat(chunks).contiguous()
    if not torch.isfinite(features).all():
        raise FeatureError(
            f"encoder {encoder.cache_id} produced NaN/inf features for the images in {folder}; "
            "check the model file or use another encoder"
        )
    return features


def extract_site_features(
    site_dir: str | os.PathLike,
    patient_ids: Sequence[str],
    encoder: Encoder,
    batch_size: int = 64,
    progress: bool = False,
    *,
    crop_scales: str | Sequence[float] | None = None,
    scale_names: Sequence[str] | None = None,
) -> ExtractResult:
    """Compute (or reuse) the features of every listed patient's images.

    Args:
        site_dir: a site folder with ``images/<patient_id>/`` (see ``data.layout``).
        patient_ids: patients to extract, usually every row of patients.csv.
        encoder: from ``get_encoder``; already on its device.
        batch_size: images read and encoded at once (bounds memory, not results).
        progress: show a tqdm progress bar over patients (if tqdm is installed).
        crop_scales: encode every image once per crop scale (``"1.0,0.5"`` or a sequence
            of fractions in (0, 1]); None = the whole image only.
        scale_names: the federation's scale folder names in index order (e.g. ``40X,
            100X, 200X, 400X``); every image must lie in one of them. None = found here
            (see the module docstring); give them when a site lacks a magnification, so
            indices mean the same at every site.

    Returns:
        ``ExtractResult(feature_dir, n_extracted, n_reused, scale_names)``.

    Raises:
        ImageError: a patient has no images (names the folder), an image is unreadable
            (names the file) or outside the given scale folders. Features already cached,
            and the manifest, stay valid.
        FeatureError: the encoder returned a wrong shape or non-finite values.
        ConfigError: ``batch_size`` < 1, bad ``crop_scales`` or ``scale_names``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    site = Path(site_dir)
    for pid in patient_ids:
        _check_patient_id(pid)
    crops = parse_crop_scales(crop_scales) if crop_scales is not None else (1.0,)
    # Crop settings change the features, so they are part of the cache's identity.
    cache_id = encoder.cache_id + _crop_suffix(crops)
    listing = _list_images(site, patient_ids)
    cache = _FeatureCache(feature_cache_dir(site, cache_id), cache_id, encoder.dim,
                          _site_scale_names(site, listing, scale_names), crops)
    n_extracted = n_reused = 0
    bar = _progress(list(patient_ids), progress)
    try:
        for pid in bar:
            image_root = site / IMAGES_DIR / pid
            fingerprint, rel_paths = _fingerprint(image_root, listing[pid], cache_id)
            if cache.reuse(pid, fingerprint):
                n_reused += 1
                continue
            features = _encode_patient(listing[pid], encoder, batch_size, image_root, crops)
            cache.store(pid, fingerprint, features, rel_paths)
            n_extracted += 1
        if not cache.manifest_path.is_file():  # an empty patient list still leaves a valid cache
            cache.dirty = True
    finally:
        # Also on errors: patients finished before a bad image keep their cache entries.
        if cache.dirty:
            cache.write_manifest()
        if hasattr(bar, "close"):
            bar.close()
    names = cache.names
    log.info("features (%s): %d extracted, %d reused%s", cache_id, n_extracted, n_reused,
             f"; scales {list(names)}" if names else "")
    return ExtractResult(feature_dir=cache.out_dir, n_extracted=n_extracted,
                         n_reused=n_reused, scale_names=names)
