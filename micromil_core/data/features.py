"""Reading and writing per-patient instance feature files (``.pt``, ``.npy``, ``.h5``).

Every reader returns the same thing: a float32 tensor of shape (N, D), one row per instance,
checked for the mistakes that otherwise surface much later as a NaN loss or a shape error
deep inside a model: an unreadable file, the wrong rank, an empty bag, non-finite values and
a feature dimension that does not match the rest of the federation.

Multi-scale sites (MRAN, see docs/multiscale.md) may also store each instance's scale index:
an ``.h5`` dataset ``scales`` (N,) or a ``.pt`` dict ``{"features": (N, D), "scales": (N,)}``;
:func:`read_features_and_scales` returns them (``.npy`` files have none).

Instance coordinates on the slide (for heatmaps): the ``.h5`` dataset ``coords`` (N, 2) of
TRIDENT/CLAM patch features, or the ``.pt`` dict key ``"coords"``; :func:`read_slide_file`
returns them with everything else a file holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from micromil_core.data.layout import FEATURE_EXTENSIONS
from micromil_core.errors import FeatureError
from micromil_core.io import torch_save_atomic

H5_FEATURES_KEY = "features"
H5_COORDS_KEY = "coords"
PT_FEATURES_KEY = "features"
SCALES_KEY = "scales"  # the same name in .h5 files and .pt dicts
COORDS_KEY = "coords"  # .pt dicts; .h5 files use H5_COORDS_KEY (the same name)
IMAGES_KEY = "images"  # .pt dicts of the feature cache: image path of each row


@dataclass(frozen=True)
class _Raw:
    """The array-like payloads of one feature file, unchecked; None where absent."""

    features: Any
    scales: Any = None
    coords: Any = None
    images: Any = None


def _load_raw(path: Path) -> _Raw:
    """Load the array-like payloads of one feature file."""
    suffix = path.suffix.lower()
    if suffix == ".pt":
        # weights_only: a feature file is data, never code; refuse pickled objects.
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if PT_FEATURES_KEY not in obj:
                raise FeatureError(
                    f"{path}: .pt file holds a dict without key {PT_FEATURES_KEY!r} "
                    f"(keys: {sorted(map(str, obj))}); save the (N, D) tensor itself or a "
                    f"dict {{'features': tensor}}"
                )
            return _Raw(
                obj[PT_FEATURES_KEY], obj.get(SCALES_KEY), obj.get(COORDS_KEY), obj.get(IMAGES_KEY)
            )
        return _Raw(obj)
    if suffix == ".npy":
        return _Raw(np.load(path, allow_pickle=False))
    if suffix == ".h5":
        import h5py  # local: only sites with .h5 files need it

        with h5py.File(path, "r") as fh:
            if H5_FEATURES_KEY not in fh:
                raise FeatureError(
                    f"{path}: HDF5 file has no dataset {H5_FEATURES_KEY!r} "
                    f"(has: {sorted(fh.keys())}); store the (N, D) features under "
                    f"{H5_FEATURES_KEY!r}"
                )
            feats = np.asarray(fh[H5_FEATURES_KEY][()])
            if feats.ndim == 3 and feats.shape[0] == 1:
                feats = feats[0]  # CLAM writes (1, N, D) in some versions
            scales = np.asarray(fh[SCALES_KEY][()]) if SCALES_KEY in fh else None
            coords = np.asarray(fh[H5_COORDS_KEY][()]) if H5_COORDS_KEY in fh else None
            return _Raw(feats, scales, coords)
    raise FeatureError(
        f"{path}: unsupported feature file extension {path.suffix!r}; "
        f"use one of {', '.join(FEATURE_EXTENSIONS)}"
    )


def _check_coords(path: Path, raw: Any, n: int) -> Tensor:
    """Validate a file's instance coordinates: (N, 2) finite numbers (x, y)."""
    fix = (
        f"store one (x, y) position per instance row under {COORDS_KEY!r} (TRIDENT/CLAM: "
        f"the patch's top-left corner in level-0 pixels), or drop {COORDS_KEY!r}"
    )
    arr = raw.detach().cpu().numpy() if isinstance(raw, Tensor) else np.asarray(raw)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]  # (1, N, 2), as features may be
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise FeatureError(f"{path}: {COORDS_KEY!r} has dtype {arr.dtype}, not numbers; {fix}")
    if arr.shape != (n, 2):
        raise FeatureError(
            f"{path}: {COORDS_KEY!r} has shape {tuple(arr.shape)} but the features have {n} "
            f"rows; expected ({n}, 2): {fix}"
        )
    if not np.isfinite(arr).all():
        raise FeatureError(f"{path}: {COORDS_KEY!r} holds NaN/Inf values; {fix}")
    return torch.from_numpy(arr.astype(np.float32))


def _check_scales(path: Path, raw: Any, n: int) -> Tensor:
    """Validate a file's per-instance scale indices: (N,) integers >= 0."""
    fix = (
        f"store one integer scale index >= 0 per instance row under {SCALES_KEY!r} "
        f"(0 = the first magnification/crop scale of the federation), or drop "
        f"{SCALES_KEY!r} for a single-scale site"
    )
    arr = raw.detach().cpu().numpy() if isinstance(raw, Tensor) else np.asarray(raw)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise FeatureError(f"{path}: {SCALES_KEY!r} has dtype {arr.dtype}, not integers; {fix}")
    if arr.shape != (n,):
        raise FeatureError(
            f"{path}: {SCALES_KEY!r} has shape {tuple(arr.shape)} but the features have {n} "
            f"rows; expected ({n},): {fix}"
        )
    if n and int(arr.min()) < 0:
        raise FeatureError(f"{path}: {SCALES_KEY!r} holds negative values ({int(arr.min())}); {fix}")
    return torch.from_numpy(arr.astype(np.int64))


def _unreadable(path: Path, exc: Exception) -> FeatureError:
    if path.suffix.lower() == ".pt":
        # Not torch's own message: it suggests weights_only=False, which would let the
        # file run code on this machine.
        detail = (
            "not a tensor saved with torch.save (a (N, D) tensor or {'features': tensor}); "
            "files that hold other Python objects are refused because loading them could "
            "run code"
        )
    else:
        detail = f"{type(exc).__name__}: {exc}; the file is corrupt or not a {path.suffix} file"
    return FeatureError(f"{path}: cannot read feature file ({detail}): re-extract or re-export it")


def read_feature_file(path: str | Path, expected_dim: int | None = None) -> Tensor:
    """Read one patient's instance features and validate them.

    The features of :func:`read_features_and_scales` (scales, if any, are validated too).

    Shapes:
        return: (N, D) float32, N >= 1
    """
    return read_features_and_scales(path, expected_dim)[0]


def read_features_and_scales(
    path: str | Path, expected_dim: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Read one patient's instance features and scale indices, and validate them.

    Args:
        path: a ``.pt`` (tensor, or dict with key ``"features"``), ``.npy`` or ``.h5``
            (dataset ``"features"``) file.
        expected_dim: the feature dimension D the caller requires, or None to accept any.

    Returns:
        The features as a contiguous CPU tensor, and the per-instance scale indices when
        the file stores them (``.h5`` dataset / ``.pt`` dict key ``"scales"``), else None.

    Shapes:
        features: (N, D) float32, N >= 1
        scales: (N,) int64, values >= 0

    Raises:
        FeatureError: the file is missing, unreadable or corrupt, is not 2-D, has zero rows
            or zero columns, contains NaN/Inf, has D != ``expected_dim``, or stores scales
            that are not N integers >= 0 (or coordinates that are not (N, 2) numbers).
    """
    slide = read_slide_file(path, expected_dim)
    return slide.features, slide.scales


@dataclass(frozen=True)
class SlideFile:
    """What one feature file (one slide, or a whole patient) holds, validated.

    Shapes:
        features: (N, D) float32, N >= 1
        scales: (N,) int64 >= 0, or None
        coords: (N, 2) float32 (x, y) positions on the slide, or None
        images: N image paths relative to ``images/<patient_id>/`` (feature cache), or None
    """

    path: Path
    features: Tensor
    scales: Tensor | None = None
    coords: Tensor | None = None
    images: list[str] | None = None


def read_slide_file(path: str | Path, expected_dim: int | None = None) -> SlideFile:
    """Read and validate everything one feature file holds (see :class:`SlideFile`).

    Raises:
        FeatureError: as :func:`read_features_and_scales`, and for coordinates that are not
            (N, 2) finite numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"{path}: feature file not found")
    if path.stat().st_size == 0:
        raise FeatureError(f"{path}: the feature file is empty (0 bytes); re-extract or re-export it")
    try:
        raw = _load_raw(path)
    except FeatureError:
        raise
    except Exception as exc:  # any library's "corrupt file" error: report it uniformly
        raise _unreadable(path, exc) from None
    feats = _checked_features(path, raw.features, expected_dim)
    n = int(feats.shape[0])
    images = raw.images
    if not (isinstance(images, list) and len(images) == n and all(isinstance(i, str) for i in images)):
        images = None  # not a cache file's row list: the rows' images are unknown
    return SlideFile(
        path,
        feats,
        None if raw.scales is None else _check_scales(path, raw.scales, n),
        None if raw.coords is None else _check_coords(path, raw.coords, n),
        images,
    )


def _checked_features(path: Path, raw: Any, expected_dim: int | None) -> Tensor:
    """The (N, D) float32 features of a file, or a FeatureError saying what is wrong."""
    try:
        if isinstance(raw, Tensor):
            feats = raw.detach().to("cpu", torch.float32)
        else:
            feats = torch.from_numpy(np.asarray(raw, dtype=np.float32))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FeatureError(
            f"{path}: features are not numeric ({type(exc).__name__}: {exc}); "
            f"store a float (N, D) array"
        ) from exc

    if feats.ndim != 2:
        raise FeatureError(
            f"{path}: features must be 2-D (N instances, D dims), got shape "
            f"{tuple(feats.shape)}; reshape to (N, D) before saving"
        )
    n, d = feats.shape
    if n == 0:
        raise FeatureError(
            f"{path}: empty bag (0 instances); every patient needs at least one instance: "
            f"re-extract the features or remove the patient from patients.csv"
        )
    if d == 0:
        raise FeatureError(f"{path}: features have 0 dimensions (shape {(n, d)})")
    finite_rows = torch.isfinite(feats).all(dim=1)  # (N,)
    if not bool(finite_rows.all()):
        bad = torch.nonzero(~finite_rows).flatten().tolist()
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise FeatureError(
            f"{path}: NaN/Inf in {len(bad)} of {n} instance rows (0-based rows: {shown}); "
            f"re-extract the features or drop those instances"
        )
    if expected_dim is not None and d != expected_dim:
        raise FeatureError(
            f"{path}: feature dimension mismatch: expected {expected_dim}, got {d}; all "
            f"patients (and all sites) must use the same encoder"
        )
    return feats.contiguous()


def write_feature_file(path: str | Path, features: Tensor, scales: Tensor | None = None) -> Path:
    """Atomically save (N, D) features as a ``.pt`` file that ``read_feature_file`` reads.

    With ``scales`` the file is the dict ``{"features": ..., "scales": ...}``.

    Shapes:
        features: (N, D), stored as float32
        scales: (N,) integer scale indices >= 0, stored as int64
    """
    path = Path(path)
    if path.suffix.lower() != ".pt":
        raise FeatureError(f"{path}: write_feature_file writes .pt files only")
    feats = features.detach().to("cpu", torch.float32).contiguous()
    if scales is None:
        return torch_save_atomic(feats, path)
    checked = _check_scales(path, scales, int(feats.shape[0]))
    return torch_save_atomic({PT_FEATURES_KEY: feats, SCALES_KEY: checked}, path)
