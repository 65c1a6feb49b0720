"""Stain normalisation of H&E tiles (Macenko, Reinhard) towards a reference image.

Hospitals stain and scan differently, so the same tissue arrives in different colours. A
site (or the federation) picks one reference image; every tile is mapped towards its stain
appearance before encoding::

    norm = StainNormaliser.from_spec("macenko:/data/reference.png")
    tile = norm(tile)                       # (H, W, 3) uint8 -> (H, W, 3) uint8
    norm.identity()                         # {"method", "reference_sha256", ...}

The maths is torchstain's NumPy backend (``pip install torchstain``; MIT licence, tested
with 1.4.1), so no torch code path is involved:

* ``macenko``: Macenko et al., "A method for normalizing histology slides for quantitative
  analysis", ISBI 2009. The tile's own H and E optical-density vectors are estimated from its
  stained pixels, its concentrations are rescaled to the reference's 99th percentiles and
  recomposed with the reference's vectors.
* ``reinhard``: Reinhard et al., "Color transfer between images", IEEE CG&A 2001: mean and
  standard deviation matched per LAB channel. Here the statistics of both the reference and
  the tile are taken over tissue pixels only and background (glass) pixels are left as they
  are: with whole-image statistics a tile that is half glass would be darkened.

Background: a pixel is tissue when its optical density ``-log((v + 1) / 256)`` summed over
R, G, B exceeds 0.3 (glass is about RGB 230, 230, 230 or brighter; the threshold of the
``histo-texture`` descriptor) and its saturation ``(max - min) / max`` exceeds 0.08 (glass
and black are grey: a darker lamp or scanner makes glass darker, not coloured). Grayscale
or fluorescence images therefore have no "tissue": do not normalise them. A tile with less than ``min_tissue`` tissue (default 10 %),
or with too few stained pixels for Macenko's angle percentiles, is returned unchanged
(``passed_through`` counts them): its colour statistics would be those of glass, and
Macenko's eigen-decomposition is undefined on it.

A reference needs at least 20 % tissue and 4,096 tissue pixels; choose a crop of a well
stained region rather than a whole slide with glass around it.

Identity: ``identity()`` (method, SHA-256 of the reference file's bytes, settings) must go
into a feature cache's id, so features made with normalisation, or with another reference,
are never mixed with features made without.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from micromil_core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "StainNormaliser",
    "hed_shift",
    "parse_stain_spec",
    "tissue_fraction",
    "tissue_mask",
]

METHODS = ("macenko", "reinhard")
NORMALISER_VERSION = 1  # bump when this module's output for the same input changes
MIN_REFERENCE_TISSUE = 0.2
MIN_REFERENCE_PIXELS = 4096
DEFAULT_MIN_TISSUE = 0.1
_TISSUE_OD = 0.3  # OD sum below this is glass (same threshold as handcrafted.py)
_TISSUE_SATURATION = 0.08  # glass is grey at any brightness: 95 % of CMU-1's glass is < 0.02
# torchstain's Macenko defaults: transmitted light I0 = 240, stained pixels have OD >= 0.15
# in every channel, stain vectors from the 1st/99th angle percentiles.
_MACENKO_IO, _MACENKO_BETA, _MACENKO_ALPHA = 240, 0.15, 1
_MIN_STAINED_PIXELS = 100  # fewer make the angle percentiles meaningless
_OD_LUT = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)

# Ruifrok & Johnston, Anal Quant Cytol Histol 23:291-299 (2001): unit OD vectors of
# haematoxylin, eosin and DAB (rows). Used only by hed_shift, to simulate other sites.
_RUIFROK_HED = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or min(arr.shape[:2]) < 1:
        raise ConfigError(
            f"{what}: expected an (H, W, 3) uint8 RGB array, got {arr.dtype} {tuple(arr.shape)}; "
            "convert it with micromil_core.encoders.images.to_rgb_uint8"
        )
    return arr


def tissue_mask(image: np.ndarray) -> np.ndarray:
    """Stained pixels: optical density summed over R, G, B above 0.3 and saturation
    ``(max - min) / max`` above 0.08 (not glass, not grey or black).

    Shapes:
        image: (H, W, 3) uint8 -> (H, W) bool
    """
    rgb = _as_rgb(image, "tissue_mask")
    dense = _OD_LUT[rgb].sum(axis=-1) > _TISSUE_OD
    top = rgb.max(axis=-1).astype(np.int16)
    spread = top - rgb.min(axis=-1)
    return dense & (spread > _TISSUE_SATURATION * top)


def tissue_fraction(image: np.ndarray) -> float:
    """Share of tissue pixels in an (H, W, 3) uint8 image, in [0, 1]."""
    return float(tissue_mask(image).mean())


def _stained_pixels(rgb: np.ndarray) -> int:
    """How many pixels Macenko's fit would use (OD >= beta in every channel at I0 = 240)."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / _MACENKO_IO)
    return int(np.count_nonzero(np.all(od >= _MACENKO_BETA, axis=1)))


def _torchstain() -> Any:
    try:
        import torchstain.numpy.normalizers as normalizers
    except ImportError as exc:
        raise ConfigError(
            "stain normalisation needs the torchstain package: "
            "`pip install 'micromil-fl[slides]'` (or `pip install torchstain`)"
        ) from exc
    return normalizers


def _file_sha256(path: Path) -> str:
    from micromil_core.encoders.external import file_sha256

    return file_sha256(path)


class StainNormaliser:
    """A stain normaliser fitted to one reference image; call it on tiles.

    Args:
        method: ``"macenko"`` or ``"reinhard"``.
        reference: image file of well-stained tissue (png/jpg/tif) chosen by the site or
            provided by the federation.
        min_tissue: tiles with a smaller tissue fraction are returned unchanged.

    Attributes:
        passed_through: number of tiles returned unchanged so far (background, or too few
            stained pixels for Macenko).

    Raises:
        ConfigError: unknown method, missing/unreadable reference, reference with too little
            tissue, or torchstain not installed.
    """

    def __init__(self, method: str, reference: str | os.PathLike, *,
                 min_tissue: float = DEFAULT_MIN_TISSUE) -> None:
        method = str(method).strip().lower()
        if method not in METHODS:
            raise ConfigError(
                f"unknown stain normalisation method {method!r}; valid: {', '.join(METHODS)} "
                "(e.g. 'macenko:/path/reference.png')"
            )
        if isinstance(min_tissue, bool) or not 0.0 <= float(min_tissue) < 1.0:
            raise ConfigError(f"min_tissue must be a fraction in [0, 1), got {min_tissue!r}")
        self.method = method
        self.reference = Path(reference)
        self.min_tissue = float(min_tissue)
        self.passed_through = 0
        ref = self._read_reference()
        self.reference_sha256 = _file_sha256(self.reference)
        self._normaliser = self._fit(ref)

    @classmethod
    def from_spec(cls, spec: str, *, min_tissue: float = DEFAULT_MIN_TISSUE) -> StainNormaliser:
        """Build from ``"<method>:<reference path>"``, e.g. ``"macenko:/data/ref.png"``."""
        method, sep, path = str(spec).strip().partition(":")
        if not sep or not path.strip():
            raise ConfigError(
                f"stain normalisation {spec!r} needs a method and a reference image: "
                f"'<method>:<path>' with method in {{{', '.join(METHODS)}}}, "
                "e.g. 'macenko:/data/reference.png'"
            )
        return cls(method, path.strip(), min_tissue=min_tissue)

    @property
    def spec(self) -> str:
        return f"{self.method}:{self.reference}"

    def identity(self) -> dict[str, Any]:
        """What changes the output: put it into the feature cache id. JSON-serialisable.

        The reference's path is left out on purpose: the same file elsewhere gives the
        same tiles, and a different file under the same name does not.
        """
        return {
            "method": self.method,
            "reference_sha256": self.reference_sha256,
            "min_tissue": self.min_tissue,
            "version": NORMALISER_VERSION,
        }

    def provenance(self) -> dict[str, Any]:
        """``identity()`` plus where the reference was read and the torchstain version."""
        try:
            library = f"torchstain {metadata.version('torchstain')}"
        except metadata.PackageNotFoundError:  # pragma: no cover - imported above
            library = "torchstain"
        return {**self.identity(), "reference": str(self.reference), "library": library}

    @property
    def cache_tag(self) -> str:
        """Short filesystem-safe tag, e.g. ``macenko-3f2a9c01d4e7``."""
        return f"{self.method}-{self.reference_sha256[:12]}"

    def _read_reference(self) -> np.ndarray:
        from micromil_core.encoders.images import read_image
        from micromil_core.errors import ImageError

        if not self.reference.is_file():
            raise ConfigError(
                f"stain reference image {self.reference} does not exist; give the path of a "
                f"PNG/JPEG/TIFF crop of well-stained tissue, e.g. '{self.method}:/data/ref.png'"
            )
        try:
            ref = read_image(self.reference)
        except ImageError as exc:
            raise ConfigError(f"stain reference: {exc}") from exc
        mask = tissue_mask(ref)
        frac, count = float(mask.mean()), int(mask.sum())
        if frac < MIN_REFERENCE_TISSUE or count < MIN_REFERENCE_PIXELS:
            raise ConfigError(
                f"stain reference {self.reference}: only {frac:.0%} of its pixels "
                f"({count}) are tissue; a reference needs >= {MIN_REFERENCE_TISSUE:.0%} and "
                f">= {MIN_REFERENCE_PIXELS} tissue pixels. Choose a crop of well-stained "
                "tissue (e.g. 1000 x 1000 pixels), not a mostly white region or a whole slide"
            )
        return ref

    def _fit(self, ref: np.ndarray) -> Any:
        normalizers = _torchstain()
        if self.method == "macenko":
            if _stained_pixels(ref) < MIN_REFERENCE_PIXELS:
                raise ConfigError(
                    f"stain reference {self.reference}: too few stained pixels for Macenko "
                    f"(< {MIN_REFERENCE_PIXELS}); choose a more strongly stained H&E crop"
                )
            norm = normalizers.NumpyMacenkoNormalizer()
            try:
                with np.errstate(all="ignore"):
                    norm.fit(ref, Io=_MACENKO_IO, alpha=_MACENKO_ALPHA, beta=_MACENKO_BETA)
            except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
                raise ConfigError(
                    f"stain reference {self.reference}: Macenko could not estimate stain "
                    f"vectors ({exc}); choose another H&E crop or use 'reinhard'"
                ) from exc
            if not (np.all(np.isfinite(norm.HERef)) and np.all(norm.maxCRef > 0)):
                raise ConfigError(
                    f"stain reference {self.reference}: Macenko found no usable H and E "
                    "vectors (is it an H&E image?); choose another crop or use 'reinhard'"
                )
            return norm
        norm = normalizers.NumpyReinhardNormalizer()
        norm.fit(ref[tissue_mask(ref)][None])  # (1, N, 3): tissue pixels only
        return norm

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalise one tile.

        Shapes:
            image: (H, W, 3) uint8 -> (H, W, 3) uint8 (a new array; the input is not changed)
        """
        rgb = _as_rgb(image, "stain normalisation input")
        mask = tissue_mask(rgb)
        if mask.mean() < self.min_tissue or not mask.any():
            return self._pass(rgb, "background")
        if self.method == "macenko":
            return self._macenko(rgb)
        return self._reinhard(rgb, mask)

    def _pass(self, rgb: np.ndarray, why: str) -> np.ndarray:
        self.passed_through += 1
        log.debug("stain normalisation: tile %s passed through unchanged (%s)", rgb.shape, why)
        return rgb.copy()

    def _macenko(self, rgb: np.ndarray) -> np.ndarray:
        if _stained_pixels(rgb) < _MIN_STAINED_PIXELS:
            return self._pass(rgb, "too few stained pixels")
        try:
            with np.errstate(all="ignore"):
                out, _, _ = self._normaliser.normalize(
                    rgb, Io=_MACENKO_IO, alpha=_MACENKO_ALPHA, beta=_MACENKO_BETA, stains=False
                )
        except (np.linalg.LinAlgError, ValueError, IndexError):
            return self._pass(rgb, "no stain vectors")
        return np.ascontiguousarray(out, dtype=np.uint8)

    def _reinhard(self, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pixels = rgb[mask]  # (N, 3)
        if np.all(pixels.std(axis=0) < 0.5):  # one flat colour: LAB std would be 0
            return self._pass(rgb, "flat colour")
        with np.errstate(all="ignore"):
            mapped = self._normaliser.normalize(pixels[None])[0]  # (N, 3) uint8
        out = rgb.copy()
        out[mask] = mapped
        return out

    def __repr__(self) -> str:
        return f"StainNormaliser({self.spec!r}, sha256={self.reference_sha256[:12]})"


def parse_stain_spec(spec: str | None, *,
                     min_tissue: float = DEFAULT_MIN_TISSUE) -> StainNormaliser | None:
    """``None``, ``""`` or ``"none"`` -> no normalisation; else ``StainNormaliser.from_spec``."""
    if spec is None or not str(spec).strip() or str(spec).strip().lower() == "none":
        return None
    return StainNormaliser.from_spec(spec, min_tissue=min_tissue)


def hed_shift(image: np.ndarray, *, scale: tuple[float, float] = (1.0, 1.0),
              rotate_deg: tuple[float, float] = (0.0, 0.0), brightness: float = 1.0,
              ) -> np.ndarray:
    """Simulate another site's staining and scanner: for tests and benchmarks.

    The tile is unmixed into haematoxylin, eosin and DAB concentrations with the Ruifrok &
    Johnston vectors; H and E concentrations are multiplied by ``scale``; each stain's OD
    vector is rotated by ``rotate_deg`` degrees (towards blue for a positive H angle, away
    from green for E) in the plane of that vector and the DAB vector; the image is recomposed
    and its transmitted light multiplied by ``brightness`` (a brighter or darker lamp/scanner).
    Glass stays near glass for scale/rotation (zero concentration is unchanged).

    Shapes:
        image: (H, W, 3) uint8 -> (H, W, 3) uint8
    """
    rgb = _as_rgb(image, "hed_shift")
    stains = _RUIFROK_HED / np.linalg.norm(_RUIFROK_HED, axis=1, keepdims=True)
    od = _OD_LUT[rgb].reshape(-1, 3)  # (P, 3)
    conc = od @ np.linalg.inv(stains)  # (P, 3): H, E, DAB
    conc[:, 0] *= scale[0]
    conc[:, 1] *= scale[1]
    shifted = stains.copy()
    for k in (0, 1):
        theta = np.deg2rad(rotate_deg[k])
        ortho = stains[2] - (stains[2] @ stains[k]) * stains[k]
        ortho /= np.linalg.norm(ortho)
        shifted[k] = np.cos(theta) * stains[k] + np.sin(theta) * ortho
        shifted[k] = np.abs(shifted[k]) / np.linalg.norm(shifted[k])
    light = 256.0 * np.exp(-(conc @ shifted)) * brightness - 1.0
    return np.clip(np.rint(light), 0, 255).astype(np.uint8).reshape(rgb.shape)
