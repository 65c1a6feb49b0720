"""The on-disk site folder format, named once.

::

    SITE/patients.csv                 patient_id,label[,split][,fine_label]
    SITE/images/<patient_id>/**       png/jpg/tif images of that patient (image path)
    SITE/features/<patient_id>.{pt,npy,h5}   precomputed (N, D) instance features
    SITE/features/<patient_id>/*.{pt,npy,h5} the same, one file per slide (several slides)
    SITE/cache/features-<encoder-id>/ features extracted here from images/ (managed)
    ROOT/sites.yaml                   which sites of a data root train and which are held out

Folders inside ``images/<patient_id>/`` (docs/getting-started.md, "Several slides"):

* a **scale folder** is named as a magnification (``40X``, ``100x``, ``2.5X``) or is one
  of the federation's scale names (``data.scales`` / ``--scales``; MRAN, docs/multiscale.md);
* any other first-level folder is a **capture** (a slide or capture session):
  ``images/<patient_id>/<capture>/*``, optionally with scale folders inside it
  (``images/<patient_id>/<capture>/40X/*``); images directly in ``images/<patient_id>/``
  (or in its scale folders) form the capture ``"."``.

Scale folders and capture folders side by side in one patient folder are ambiguous and
refused (:func:`image_layout_problem`), as is a patient with both ``features/<id>.pt`` and
a folder ``features/<id>/`` (:func:`find_patient_features`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from micromil_core.errors import SiteDataError

PATIENTS_CSV = "patients.csv"
IMAGES_DIR = "images"
FEATURES_DIR = "features"
CACHE_DIR = "cache"
SITES_YAML = "sites.yaml"

REQUIRED_COLUMNS = ("patient_id", "label")
OPTIONAL_COLUMNS = ("split", "fine_label")
SPLITS = ("train", "val", "test")

# .svs and pyramidal .tif are whole slides: extraction tiles them (encoders/wsi.py).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".svs")
FEATURE_EXTENSIONS = (".pt", ".npy", ".h5")

# A magnification: a number and an X (40X, 100x, 2.5X), the names microscopes and
# BreakHis give to the folders of one magnification.
MAGNIFICATION_FOLDER = re.compile(r"^\d+(?:\.\d+)?[xX]$")
TOP_CAPTURE = "."  # the capture of the images directly in images/<patient_id>/


def list_patient_images(site_dir: str | Path, patient_id: str) -> list[Path]:
    """All image files of one patient, recursively, in a stable (sorted) order."""
    folder = Path(site_dir) / IMAGES_DIR / patient_id
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def is_scale_folder(name: str, scale_names: Collection[str] = ()) -> bool:
    """Whether an image folder name means a scale (magnification) rather than a capture."""
    return bool(MAGNIFICATION_FOLDER.match(name)) or name in scale_names


@dataclass(frozen=True)
class ImagePlace:
    """Where an image sits in its patient's folder: its capture and its scale folder."""

    capture: str  # TOP_CAPTURE for images directly in images/<patient_id>/
    scale: str | None  # None outside a scale folder


def image_place(rel_path: str, scale_names: Collection[str] = ()) -> ImagePlace:
    """The capture and scale folder of an image path relative to ``images/<patient_id>/``
    (POSIX separators): ``40X/a.png`` -> (".", "40X"); ``slide1/40X/a.png`` ->
    ("slide1", "40X"); ``slide1/a.png`` -> ("slide1", None). Deeper folders only organise."""
    folders = rel_path.split("/")[:-1]
    if not folders:
        return ImagePlace(TOP_CAPTURE, None)
    if is_scale_folder(folders[0], scale_names):
        return ImagePlace(TOP_CAPTURE, folders[0])
    inner = folders[1] if len(folders) > 1 and is_scale_folder(folders[1], scale_names) else None
    return ImagePlace(folders[0], inner)


def image_layout_problem(
    patient_dir: Path, rel_paths: Sequence[str], scale_names: Collection[str] = ()
) -> str | None:
    """Why a patient's image folders are ambiguous, or None: scale folders (magnifications)
    beside other folders could be captures holding scales or scales with odd names."""
    first = {r.split("/")[0] for r in rel_paths if "/" in r}
    scales = sorted(f for f in first if is_scale_folder(f, scale_names))
    others = sorted(f for f in first if not is_scale_folder(f, scale_names))
    if not (scales and others):
        return None
    return (
        f"{patient_dir}: folder(s) {others} sit beside magnification folder(s) {scales}, so "
        f"it is ambiguous whether they are captures (slides) or scales; for several "
        f"captures put the scale folders inside each capture "
        f"({patient_dir.name}/{others[0]}/{scales[0]}/, and the loose scale folders into a "
        f"capture folder of their own); for scales name every folder as a magnification "
        f"(e.g. 40X) or list them in data.scales / --scales"
    )


def find_feature_file(feature_dir: str | Path, patient_id: str) -> Path | None:
    """The feature file of one patient in ``feature_dir`` (first of .pt, .npy, .h5), or None."""
    for ext in FEATURE_EXTENSIONS:
        candidate = Path(feature_dir) / f"{patient_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def find_patient_features(feature_dir: str | Path, patient_id: str) -> list[Path] | None:
    """The feature files of one patient: ``[<id>.<ext>]``, or the files of the folder
    ``<id>/`` (one per slide) sorted by name; None when the patient has neither.

    Raises:
        SiteDataError: the patient has both a file and a folder, or a folder without
            feature files.
    """
    single = find_feature_file(feature_dir, patient_id)
    folder = Path(feature_dir) / patient_id
    if not folder.is_dir():
        return None if single is None else [single]
    if single is not None:
        raise SiteDataError(
            f"patient {patient_id!r} has both the feature file {single} and the slide folder "
            f"{folder}/; keep one: move {single.name} into {folder.name}/ as one of its slides, "
            f"or remove the folder"
        )
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FEATURE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not files:
        raise SiteDataError(
            f"{folder}: slide folder of patient {patient_id!r} holds no feature file "
            f"({', '.join(FEATURE_EXTENSIONS)}); put one file per slide there or remove it"
        )
    return files


def feature_cache_dir(site_dir: str | Path, encoder_id: str) -> Path:
    """Where features extracted with one encoder from ``images/`` are cached."""
    return Path(site_dir) / CACHE_DIR / f"features-{encoder_id}"
