"""Fill a site's feature cache from its images, reusing what is already up to date.

Cache layout (``feature_cache_dir(site_dir, encoder.cache_id)``)::

    <patient_id>.pt    torch.save of {"features": (N, D) float32 tensor,
                                      "images": [N image paths relative to images/<patient_id>/,
                                                 POSIX separators, row order of features],
                                      "encoder": cache_id, "format": 1}
    manifest.json      {"format": 1, "encoder": cache_id, "dim": D,
                        "patients": {<patient_id>: {"fingerprint": sha256 hex,
                                                    "n_images": N, "file": "<patient_id>.pt"}}}

The fingerprint hashes the encoder's ``cache_id`` and, per image, its relative path, size
and mtime_ns, so a patient is recomputed when an image is added, removed, renamed or
rewritten, and reused without opening a single image otherwise.

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
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "MANIFEST_NAME", "ExtractResult", "extract_site_features"]

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
    """

    feature_dir: Path
    n_extracted: int
    n_reused: int


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
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm  # optional: only a nicety
    except ImportError:
        log.info("tqdm is not installed; extracting %d patients without a progress bar",
                 len(items))
        return items
    return tqdm(items, desc="extracting features", unit="patient")


def _encode_patient(images: Sequence[Path], encoder: Encoder, batch_size: int,
                    folder: Path) -> torch.Tensor:
    """Features of one patient's images, read and encoded ``batch_size`` at a time.

    Shapes:
        returns (len(images), encoder.dim) float32
    """
    chunks = []
    for batch in _batches(images, batch_size):
        arrays = [read_image(p) for p in batch]
        feats = encoder.encode(arrays)
        if feats.shape != (len(batch), encoder.dim):
            raise FeatureError(
                f"encoder {encoder.cache_id} returned shape {tuple(feats.shape)} for "
                f"{len(batch)} images of {folder}; expected ({len(batch)}, {encoder.dim})"
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
) -> ExtractResult:
    """Compute (or reuse) the features of every listed patient's images.

    Args:
        site_dir: a site folder with ``images/<patient_id>/`` (see ``data.layout``).
        patient_ids: patients to extract, usually every row of patients.csv.
        encoder: from ``get_encoder``; already on its device.
        batch_size: images read and encoded at once (bounds memory, not results).
        progress: show a tqdm progress bar over patients (if tqdm is installed).

    Returns:
        ``ExtractResult(feature_dir, n_extracted, n_reused)``.

    Raises:
        ImageError: a patient has no images (names the folder) or an image is unreadable
            (names the file). Features already cached, and the manifest, stay valid.
        FeatureError: the encoder returned a wrong shape or non-finite values.
        ConfigError: ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    site = Path(site_dir)
    for pid in patient_ids:
        _check_patient_id(pid)
    cache_id = encoder.cache_id
    out_dir = feature_cache_dir(site, cache_id)
    manifest_path = out_dir / MANIFEST_NAME
    entries = _load_manifest(manifest_path, cache_id)
    n_extracted = n_reused = 0
    dirty = False
    last_write = time.monotonic()

    def write_manifest() -> None:
        write_json_atomic(manifest_path, {
            "format": CACHE_FORMAT, "encoder": cache_id, "dim": encoder.dim,
            "patients": entries,
        })

    bar = _progress(list(patient_ids), progress)
    try:
        for pid in bar:
            image_root = site / IMAGES_DIR / pid
            images = list_patient_images(site, pid)
            if not images:
                raise ImageError(
                    f"patient {pid!r} has no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                    f"{image_root}; add its images there or remove the patient from "
                    "patients.csv"
                )
            fingerprint, rel_paths = _fingerprint(image_root, images, cache_id)
            entry = entries.get(pid)
            target = out_dir / f"{pid}.pt"
            if (entry is not None and entry.get("fingerprint") == fingerprint
                    and target.is_file()):
                n_reused += 1
                continue
            features = _encode_patient(images, encoder, batch_size, image_root)
            torch_save_atomic(
                {"features": features, "images": rel_paths, "encoder": cache_id,
                 "format": CACHE_FORMAT},
                target,
            )
            entries[pid] = {"fingerprint": fingerprint, "n_images": len(images),
                            "file": target.name}
            n_extracted += 1
            dirty = True
            if time.monotonic() - last_write >= _MANIFEST_EVERY_S:
                write_manifest()
                dirty, last_write = False, time.monotonic()
        if not manifest_path.is_file():  # an empty patient list still leaves a valid cache
            dirty = True
    finally:
        # Also on errors: patients finished before a bad image keep their cache entries.
        if dirty:
            write_manifest()
        if hasattr(bar, "close"):
            bar.close()
    log.info("features (%s): %d extracted, %d reused", cache_id, n_extracted, n_reused)
    return ExtractResult(feature_dir=out_dir, n_extracted=n_extracted, n_reused=n_reused)
