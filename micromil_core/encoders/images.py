"""Reading microscopy image files into one array format: uint8 RGB.

Every encoder consumes ``(H, W, 3)`` uint8 arrays, whatever the file held:

* grayscale, palette and bilevel images are replicated to three channels;
* RGBA / LA images are composited onto white, because microscopy background (glass) is
  white: dropping alpha instead would turn transparent padding black and look like tissue;
* 16-bit images are scaled by 1/257 (0..65535 -> 0..255), a fixed map, so two images of one
  scanner keep their relative brightness (a per-image min-max stretch would not);
* float images with values in [0, 1] are scaled by 255, other float ranges are min-max
  stretched (there is no natural fixed range to use);
* multi-page files (TIFF stacks) contribute their first page.

PIL reads png/jpg/bmp/tif. TIFFs PIL cannot decode (e.g. 16-bit RGB, some compressions) are
retried with ``tifffile`` when it is installed (``pip install tifffile imagecodecs``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from micromil_core.errors import ImageError

log = logging.getLogger(__name__)

__all__ = ["read_image", "to_rgb_uint8"]

_TIFF_SUFFIXES = (".tif", ".tiff")


def _fix_hint(path: Path) -> str:
    return f"re-export {path} as PNG/JPEG/TIFF or remove it from the patient's image folder"


def to_rgb_uint8(array: np.ndarray, *, source: str = "image array") -> np.ndarray:
    """Convert a decoded image array of any common layout to uint8 RGB.

    Args:
        array: (H, W), (H, W, 1), (H, W, 2) gray+alpha, (H, W, 3) or (H, W, 4) RGBA;
            channel-first (C, H, W) with C in {1, 3, 4} is accepted too. Any integer or
            float dtype.
        source: how to name the array in an error (a file path when reading a file).

    Shapes:
        returns (H, W, 3) uint8, C-contiguous.
    """
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first, as tifffile returns some stacks
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or min(arr.shape[:2]) < 1:
        raise ImageError(
            f"{source}: shape {tuple(arr.shape)} is not an image; expected (H, W), "
            "(H, W, 3) or (H, W, 4) with H, W >= 1"
        )
    if arr.dtype == np.uint8 and arr.shape[-1] in (1, 3):  # the common case: no arithmetic
        return np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    alpha = None
    if arr.shape[-1] in (2, 4):
        arr, alpha = arr[..., :-1], arr[..., -1]
    rgb = _scale_to_unit(arr, source) if arr.dtype != np.uint8 else arr.astype(np.float32) / 255
    if alpha is not None:
        a = _scale_to_unit(alpha, source) if alpha.dtype != np.uint8 else alpha / 255.0
        rgb = rgb * a[..., None] + (1.0 - a[..., None])  # composite onto white glass
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    out = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def _scale_to_unit(arr: np.ndarray, source: str) -> np.ndarray:
    """Map an integer or float array to float32 in [0, 1] (see the module docstring)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit microscopy data is by far the common case; wider integers (PIL mode "I")
        # usually hold 16-bit values too, so the same fixed 1/257 map applies.
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            return _minmax(arr.astype(np.float64))
        return arr.astype(np.float32) / 65535
    if np.issubdtype(arr.dtype, np.floating):
        data = arr.astype(np.float64)
        if not np.all(np.isfinite(data)):
            raise ImageError(f"{source}: contains NaN or infinite pixel values; re-export it")
        if data.size and data.min() >= 0.0 and data.max() <= 1.0:
            return data.astype(np.float32)
        return _minmax(data)
    raise ImageError(f"{source}: unsupported pixel type {arr.dtype}; re-export it as 8-bit RGB")


def _minmax(data: np.ndarray) -> np.ndarray:
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(data.shape, np.float32)
    return ((data - lo) / (hi - lo)).astype(np.float32)


def _read_with_pil(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # decode now: truncated or corrupt data raises here, not later
        mode = img.mode
        if mode in ("RGB", "L", "RGBA", "LA"):
            return np.asarray(img)
        if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
            target = "RGBA" if ("A" in mode or "transparency" in img.info) else "RGB"
            return np.asarray(img.convert(target))
        # 16/32-bit integer and float single-channel modes ("I;16", "I", "F", ...).
        return np.asarray(img)


def _read_with_tifffile(path: Path) -> np.ndarray | None:
    try:
        import tifffile  # optional: only for TIFFs PIL cannot decode
    except ImportError:
        return None
    with tifffile.TiffFile(path) as tif:
        return np.asarray(tif.pages[0].asarray())


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image file as uint8 RGB.

    Args:
        path: a .png, .jpg/.jpeg, .bmp or .tif/.tiff file.

    Shapes:
        returns (H, W, 3) uint8.

    Raises:
        ImageError: the file is missing, unreadable, truncated or not an image; the message
            names the file and suggests re-exporting or removing it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist (was it moved or deleted?)")
    if path.stat().st_size == 0:
        raise ImageError(f"cannot read image {path}: the file is empty (0 bytes): {_fix_hint(path)}")
    pil_error: Exception | None = None
    try:
        data = _read_with_pil(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        pil_error = exc
        data = None
    if data is None and path.suffix.lower() in _TIFF_SUFFIXES:
        try:
            data = _read_with_tifffile(path)
        except Exception as exc:  # tifffile raises many types for bad files
            log.debug("tifffile could not read %s: %s", path, exc)
            data = None
    if data is None:
        reason = f"{type(pil_error).__name__}: {pil_error}" if pil_error else "unknown format"
        tiff_hint = (
            " (for TIFFs PIL cannot decode, `pip install tifffile imagecodecs` may help)"
            if path.suffix.lower() in _TIFF_SUFFIXES
            else ""
        )
        raise ImageError(
            f"cannot read image {path}: {reason}; the file is corrupt, truncated or not an "
            f"image{tiff_hint}: {_fix_hint(path)}"
        ) from pil_error
    return to_rgb_uint8(data, source=str(path))
