"""The on-disk site folder format, named once.

::

    SITE/patients.csv                 patient_id,label[,split][,fine_label]
    SITE/images/<patient_id>/**       png/jpg/tif images of that patient (image path)
    SITE/features/<patient_id>.{pt,npy,h5}   precomputed (N, D) instance features
    SITE/cache/features-<encoder-id>/ features extracted here from images/ (managed)
    ROOT/sites.yaml                   which sites of a data root train and which are held out
"""

from __future__ import annotations

from pathlib import Path

PATIENTS_CSV = "patients.csv"
IMAGES_DIR = "images"
FEATURES_DIR = "features"
CACHE_DIR = "cache"
SITES_YAML = "sites.yaml"

REQUIRED_COLUMNS = ("patient_id", "label")
OPTIONAL_COLUMNS = ("split", "fine_label")
SPLITS = ("train", "val", "test")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FEATURE_EXTENSIONS = (".pt", ".npy", ".h5")


def list_patient_images(site_dir: str | Path, patient_id: str) -> list[Path]:
    """All image files of one patient, recursively, in a stable (sorted) order."""
    folder = Path(site_dir) / IMAGES_DIR / patient_id
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def find_feature_file(feature_dir: str | Path, patient_id: str) -> Path | None:
    """The feature file of one patient in ``feature_dir`` (first of .pt, .npy, .h5), or None."""
    for ext in FEATURE_EXTENSIONS:
        candidate = Path(feature_dir) / f"{patient_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def feature_cache_dir(site_dir: str | Path, encoder_id: str) -> Path:
    """Where features extracted with one encoder from ``images/`` are cached."""
    return Path(site_dir) / CACHE_DIR / f"features-{encoder_id}"
