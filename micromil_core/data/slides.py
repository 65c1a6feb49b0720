"""One bag per patient from several slides or captures, keeping the slide of each instance.

A patient's features may be one file (``features/<patient_id>.pt``) or a folder with one
file per slide (``features/<patient_id>/*.{h5,pt,npy}``, see
:func:`~micromil_core.data.layout.find_patient_features`). :func:`read_patient_features`
concatenates the slides, in file-name order, into one bag and records for every instance
its slide (:class:`~micromil_core.data.bag.Slides`) and, where the file has them, its
coordinates on the slide (TRIDENT/CLAM ``.h5``: datasets ``features`` (N, D) and
``coords`` (N, 2)). Features extracted here from ``images/<patient_id>/<capture>/*`` are
one cache file per patient whose rows name their images: their captures become the slides
(each image, when the rows are tiles with positions in their image).

The slide index and coordinates stay on the site: models see only the padded features.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from micromil_core.data.bag import Slides
from micromil_core.data.features import SlideFile, read_slide_file
from micromil_core.data.layout import image_place
from micromil_core.errors import FeatureError

# The feature cache's manifest (micromil_core.encoders.extract.MANIFEST_NAME): its
# "scales" name the scale folders, which must not be mistaken for captures.
_CACHE_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PatientFeatures:
    """One patient's bag read from its slide files.

    Shapes:
        features: (N, D) float32, N = the slides' instances together
        scales: (N,) int64, or None when no slide stores scales
    """

    features: Tensor
    scales: Tensor | None
    slides: Slides
    files: tuple[Path, ...]


def read_patient_features(
    files: Sequence[Path], expected_dim: int | None = None
) -> PatientFeatures:
    """Read and concatenate one patient's slide files (in the order given).

    Args:
        files: from :func:`~micromil_core.data.layout.find_patient_features`.
        expected_dim: the feature dimension D the caller requires, or None.

    Raises:
        FeatureError: a file is unreadable (see
            :func:`~micromil_core.data.features.read_slide_file`), the slides differ in
            feature dimension, or some slides store scale indices and others do not.
    """
    if not files:
        raise FeatureError("read_patient_features needs at least one feature file")
    slides = [read_slide_file(f) for f in files]
    first = slides[0]
    dim = int(first.features.shape[1])
    for s in slides[1:]:
        d = int(s.features.shape[1])
        if d != dim:
            raise FeatureError(
                f"{s.path}: feature dimension {d} differs from {dim} of {first.path.name}, "
                f"another slide of the same patient; all slides of a patient must come from "
                f"the same encoder: re-extract {s.path.name} with it or remove it"
            )
    if expected_dim is not None and dim != expected_dim:
        raise FeatureError(
            f"{first.path}: feature dimension mismatch: expected {expected_dim}, got {dim}; "
            f"all patients (and all sites) must use the same encoder"
        )
    with_scales = [s.path.name for s in slides if s.scales is not None]
    if with_scales and len(with_scales) < len(slides):
        without = next(s.path for s in slides if s.scales is None)
        raise FeatureError(
            f"{without}: has no scale indices but {with_scales[0]}, another slide of the same "
            f"patient, has; store 'scales' in every slide of the patient or in none"
        )
    features = torch.cat([s.features for s in slides]).contiguous()  # (N, D)
    scales = torch.cat([s.scales for s in slides]) if with_scales else None  # (N,)
    if len(slides) == 1 and first.images is not None:
        info = _capture_slides(first.images, first.coords, first.path.parent)
    else:
        info = _file_slides(slides)
    return PatientFeatures(features, scales, info, tuple(s.path for s in slides))


def _file_slides(slides: list[SlideFile]) -> Slides:
    """One slide per file, named by its file name; coordinates where the file has them."""
    index = torch.cat(
        [torch.full((len(s.features),), i, dtype=torch.long) for i, s in enumerate(slides)]
    )
    coords = None
    if any(s.coords is not None for s in slides):
        coords = torch.cat(
            [
                s.coords if s.coords is not None else torch.full((len(s.features), 2), torch.nan)
                for s in slides
            ]
        )  # (N, 2)
    return Slides([s.path.name for s in slides], index, coords)


def _capture_slides(images: list[str], coords: Tensor | None, folder: Path) -> Slides:
    """A cache file's rows (``images``: the image of each row) grouped by the capture folder
    of their image, in order of first appearance (``"."``: directly in the patient's folder).

    Rows with coordinates (tiles of large images) are grouped by image instead: a tile's
    position is one in its own image, so each image is a slide of its own.
    """
    scale_names = _cache_scale_names(folder)
    names: list[str] = []
    index = []
    for rel in images:
        capture = rel if coords is not None else image_place(rel, scale_names).capture
        if capture not in names:
            names.append(capture)
        index.append(names.index(capture))
    return Slides(names, torch.tensor(index, dtype=torch.long), coords)


def _cache_scale_names(folder: Path) -> set[str]:
    """The scale folder names a feature cache's manifest records (``40X@0.5`` -> ``40X``)."""
    try:
        manifest = json.loads((folder / _CACHE_MANIFEST).read_text())
        return {str(n).split("@")[0] for n in manifest.get("scales", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()  # no manifest (a features/ file with an image list): names decide
