"""A per-site acquisition shift for the image datasets prepared here (``--site-shift``).

Hospitals differ not only in their label mix (``--partition dirichlet:<alpha>``) but in how
their images look: scanner, stain and exposure. A federation split by labels alone shares
one image distribution per class, so a model made for one site cannot rank that site's
patients better than the global model can (AUC ignores the label mix); only a shift in the
images gives personal models something to learn that the global model cannot.

``intensity:<sigma>``: every site gets its own intensity curve, applied to all of its
images (training, validation and test alike, as a scanner would)::

    x' = clip(contrast * (x^gamma - 0.5) + 0.5 + brightness, 0, 1),  x in [0, 1]
    gamma = exp(sigma z1), contrast = exp(sigma z2 / 2), brightness = sigma z3 / 10

with z ~ N(0, 1) drawn per site from the prepare seed (independently of the partition's
draws). sigma 0.4 gives gammas of about 0.67-1.5 and contrasts of 0.8-1.2 (one sd).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from micromil_core.errors import ConfigError

SHIFT_FORMS = ("none", "intensity:<sigma>  (sigma >= 0)")


@dataclass(frozen=True)
class IntensityShift:
    """One site's intensity curve (see the module docstring)."""

    gamma: float
    contrast: float
    brightness: float

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Shapes: uint8 (H, W) or (H, W, C) -> the same, shifted."""
        if image.dtype != np.uint8:
            raise ConfigError(f"a site shift works on 8-bit images, got {image.dtype}")
        x = image.astype(np.float32) / 255.0
        x = self.contrast * (np.power(x, self.gamma) - 0.5) + 0.5 + self.brightness
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

    def describe(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def parse_site_shift(spec: str | None) -> float | None:
    """``none``/empty -> None; ``intensity:<sigma>`` -> sigma."""
    text = (spec or "none").strip().lower()
    if text == "none":
        return None
    kind, sep, value = text.partition(":")
    try:
        sigma = float(value) if sep and kind == "intensity" else math.nan
    except ValueError:
        sigma = math.nan
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"site shift {spec!r} is not one of: {', '.join(SHIFT_FORMS)} "
                          "(e.g. 'intensity:0.4')")
    return sigma


def site_shifts(spec: str | None, n_sites: int, seed: int) -> list[IntensityShift | None]:
    """Each site's shift, reproducible from ``seed`` (all None without a shift)."""
    sigma = parse_site_shift(spec)
    if not sigma:  # none, or intensity:0 (every curve the identity)
        return [None] * n_sites
    z = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).standard_normal((n_sites, 3))
    return [IntensityShift(float(np.exp(sigma * a)), float(np.exp(sigma * b / 2)), float(sigma * c / 10))
            for a, b, c in z]
