"""Scale indices of feature rows (MRAN; docs/multiscale.md): magnification folders
``images/<patient_id>/<scale>/`` and central crops of one capture. The rules are described in
``extract.py``'s module docstring; this module holds their code.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from micromil_core.data.layout import IMAGES_DIR, image_layout_problem, image_place
from micromil_core.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

__all__ = ["center_crop", "order_scale_names", "parse_crop_scales"]

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


def _scale_folder(rel_path: str, names: Sequence[str] = ()) -> str | None:
    """The scale folder of an image path relative to images/<pid>/ (in a capture folder or
    not), None outside one; the rule is ``data.layout.image_place``'s."""
    return image_place(rel_path, names).scale


def _site_scale_names(
    site: Path, listing: dict[str, list[Path]], scale_names: Sequence[str] | None
) -> tuple[str, ...]:
    """The site's folder scale names in index order; ``()`` when it is single-scale."""
    rel = {pid: [p.relative_to(site / IMAGES_DIR / pid).as_posix() for p in images]
           for pid, images in listing.items()}
    for pid, paths in rel.items():  # scale folders beside capture folders: refuse to guess
        problem = image_layout_problem(site / IMAGES_DIR / pid, paths, scale_names or ())
        if problem:
            raise ImageError(problem)
    folders = {pid: {_scale_folder(r, scale_names or ()) for r in paths}
               for pid, paths in rel.items()}
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
    folder = [index[_scale_folder(r, folder_names)] if folder_names else 0 for r in rel_paths]
    return torch.tensor(
        [f * n_crops + row % n_crops for row, f in enumerate(folder)], dtype=torch.long
    )


def _relabel(target: Path, save: Callable[..., None]) -> bool:
    """Rewrite a cached file's scale indices from its stored rows (tile coordinates kept);
    False if it is unusable."""
    try:
        cached = torch.load(target, map_location="cpu", weights_only=True)
        save(target, cached["features"], [str(r) for r in cached["images"]],
             coords=cached.get("coords"))
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
