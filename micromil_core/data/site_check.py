"""``micromil check-site``: a readable report of what is wrong (or fine) in a site folder,
with the fix for each problem.

Sites with several slides or captures per patient (``features/<patient_id>/*.h5``,
``images/<patient_id>/<capture>/*``) are summarised too: slides per patient and how many
carry instance coordinates (what heatmaps need).
"""

from __future__ import annotations

import difflib
import statistics
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micromil_core.data.data_root import classes_declared_for
from micromil_core.data.layout import (
    FEATURE_EXTENSIONS,
    FEATURES_DIR,
    IMAGES_DIR,
    PATIENTS_CSV,
    SPLITS,
    find_patient_features,
    image_layout_problem,
    image_place,
    list_patient_images,
)
from micromil_core.data.site import (
    MAX_SHOWN,
    PatientRecord,
    _Parsed,
    check_vocabulary,
    parse_patients_csv,
)
from micromil_core.data.slides import read_patient_features
from micromil_core.errors import SiteDataError

# Below this many patients a site's local validation metrics are mostly noise.
TINY_SITE_PATIENTS = 10


# Error lists are kept whole in the report; format() shows MAX_SHOWN per section.
@dataclass
class SiteReport:
    """Everything ``check_site`` found: errors block training, warnings deserve a look.

    ``errors``/``warnings`` may name patient ids: keep them on site. ``stats`` holds only
    counts and is safe to share with the federation.
    """

    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "stats": dict(self.stats),
        }

    def format(self) -> str:
        """A human-readable report, errors first."""
        s = self.stats
        lines = [f"site {self.path}: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        if "n_patients" in s:
            lines.append(f"  patients: {s['n_patients']}")
            counts = [f"{k}={v}" for k, v in s.get("patients_per_class", {}).items()]
            if "unlabelled" in s:  # a folder of patients to score
                counts.append(f"unlabelled={s['unlabelled']}")
            lines.append("  per class: " + ", ".join(counts))
            per_split = s.get("patients_per_split")
            if per_split or "unlabelled" not in s:
                lines.append(
                    "  per split: "
                    + (
                        ", ".join(f"{k}={v}" for k, v in per_split.items())
                        if per_split
                        else "none (no split column: cross-validation)"
                    )
                )
            inst = s.get("instances")
            if inst:
                lines.append(
                    f"  instances per patient ({inst['source']}): min {inst['min']}, "
                    f"mean {inst['mean']:.1f}, max {inst['max']}"
                )
            lines.append(
                f"  features: {s.get('n_with_features', 0)} patients"
                f" (dim {s.get('feature_dim')}); images: {s.get('n_with_images', 0)} patients"
            )
            if s.get("slides"):
                lines.append(_slides_line(s["slides"]))
        for title, items in (("errors", self.errors), ("warnings", self.warnings)):
            if not items:
                continue
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    - {m}" for m in items[:MAX_SHOWN])
            if len(items) > MAX_SHOWN:
                lines.append(f"    ... and {len(items) - MAX_SHOWN} more")
        return "\n".join(lines)


def _check_images(paths: list[Path], errors: list[str]) -> int:
    """Verify image files cheaply (header + structure, no full decode); count good ones."""
    from PIL import Image  # local: feature-only sites never need PIL

    # PIL signals a broken file with any of these, depending on where parsing stops.
    pil_errors = (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        IndexError,
        struct.error,
        Image.DecompressionBombError,
    )
    good = 0
    for p in paths:
        if p.stat().st_size == 0:
            errors.append(f"{p}: empty image file (0 bytes); replace or remove it")
            continue
        try:
            with Image.open(p) as im:
                im.verify()
            good += 1
        except pil_errors as exc:
            errors.append(
                f"{p}: unreadable image ({type(exc).__name__}: {exc}); replace or remove it"
            )
    return good


def check_site(
    path: str | Path,
    classes: Sequence[str] | None = None,
    feature_dir: str | Path | None = None,
    expected_dim: int | None = None,
    labels_required: bool = True,
) -> SiteReport:
    """Check a site folder and collect every problem instead of stopping at the first.

    ``labels_required`` False checks a folder of patients to score (``micromil predict``):
    labels may then be missing, and the class-balance warnings are left out.

    Never raises for data problems (only for a malformed ``classes`` argument). Errors:
    anything that makes :func:`load_site`/:func:`load_bags` or image extraction fail.
    Warnings: single-class site, tiny site, a class with < 2 patients, split column without
    a val split, extra columns, stray image folders or feature files of unlisted patients.
    """
    site_dir = Path(path)
    report = SiteReport(path=site_dir)
    if classes is None:  # a site of a data root: its sites.yaml declares the classes
        classes = classes_declared_for(site_dir)
    classes_t = check_vocabulary("classes", classes)
    parsed = parse_patients_csv(site_dir, classes_t, None, report.errors, labels_required)
    if parsed is None:
        return report
    fdir = Path(feature_dir) if feature_dir is not None else site_dir / FEATURES_DIR
    csv_path = site_dir / PATIENTS_CSV

    stats = _patient_counts(parsed, labels_required)
    if classes_t is None and labels_required:
        report.errors += rare_label_problems([(csv_path, parsed.records)])
    report.warnings += _patient_warnings(parsed, stats, csv_path, labels_required)
    files = _scan_patient_files(parsed.records, site_dir, fdir, csv_path, expected_dim, report.errors)
    feature_dim = _check_feature_dims(files, expected_dim, report.errors)
    report.warnings += _stray_file_warnings(parsed.records, site_dir, fdir)

    source, counts = ("features", files.n_inst) if files.n_inst else ("images", files.n_img)
    if files.n_slides:
        stats["slides"] = _slide_stats(files)
    if counts:
        stats["instances"] = {
            "source": source,
            "min": min(counts),
            "mean": sum(counts) / len(counts),
            "max": max(counts),
        }
    stats.update(
        feature_dim=feature_dim,
        has_features=files.n_feat_ok > 0,
        has_images=files.n_with_img > 0,
        n_with_features=files.n_feat_ok,
        n_with_images=files.n_with_img,
        n_needs_extraction=files.n_needs_extraction,
    )
    report.stats = stats
    return report


def rare_label_problems(tables: Sequence[tuple[Path, Sequence[PatientRecord]]]) -> list[str]:
    """Labels that fewer than 2 patients carry, over all ``(patients.csv, its rows)`` given.

    Used where no class list is declared: such a label is almost always a typo, and
    taken as a class it would add a class to the model (with an AUC that cannot be
    computed). Each problem names the row and the closest other label as the likely fix.
    """
    counts = Counter(r.label for _, records in tables for r in records if r.label)
    problems = []
    for label, n in sorted(counts.items()):
        if n >= 2:
            continue
        csv_path, row = next(
            (path, r.row) for path, records in tables for r in records if r.label == label
        )
        others = [c for c in counts if c != label and counts[c] >= 2] or [c for c in counts if c != label]
        closest = difflib.get_close_matches(label, others, n=1, cutoff=0.0)
        hint = f" (did you mean {closest[0]!r}?)" if closest else ""
        problems.append(
            f"{csv_path} row {row}: label {label!r} is carried by this patient only{hint}; fix the "
            f"label, or if {label!r} is a real class declare the class list (sites.yaml "
            f"'classes', --classes, or data.classes)"
        )
    return problems


def _patient_counts(parsed: _Parsed, labels_required: bool) -> dict[str, Any]:
    """Patients per class and split: counts only, safe to share."""
    records = parsed.records
    per_class = Counter(r.label for r in records)
    stats: dict[str, Any] = {
        "n_patients": len(records),
        "classes": list(parsed.classes),
        "patients_per_class": {c: per_class.get(c, 0) for c in parsed.classes},
        "patients_per_split": None,
    }
    if not labels_required:
        stats["unlabelled"] = sum(1 for r in records if not r.label)
    if any(r.split is not None for r in records):
        per_split = Counter(r.split for r in records)
        stats["patients_per_split"] = {s: per_split.get(s, 0) for s in SPLITS}
        stats["patients_per_split_class"] = {
            s: {c: sum(1 for r in records if r.split == s and r.label == c) for c in parsed.classes}
            for s in SPLITS
        }
    return stats


def _patient_warnings(
    parsed: _Parsed, stats: dict[str, Any], csv_path: Path, labels_required: bool
) -> list[str]:
    """Warnings about the patient list: no val split, unknown columns, class balance, size."""
    records = parsed.records
    per_class = Counter(r.label for r in records)
    warnings = []
    per_split = stats["patients_per_split"]
    if per_split is not None and per_split["val"] == 0:
        warnings.append(
            f"{csv_path}: split column has no 'val' patients; a validation set will be "
            f"carved from the train patients (train.val_fraction), or mark some as val"
        )
    if parsed.extra_columns:
        warnings.append(f"{csv_path}: ignoring unknown column(s) {parsed.extra_columns}")
    present = [c for c in parsed.classes if per_class.get(c, 0) > 0]
    if records and len(present) < 2 and labels_required:
        warnings.append(
            f"{csv_path}: single-class site (only {present}); it can train in a federation "
            f"but local AUC and balanced accuracy are undefined"
        )
    for c in parsed.classes if labels_required else ():
        if 0 < per_class.get(c, 0) < 2:
            warnings.append(
                f"{csv_path}: class {c!r} has only {per_class[c]} patient; stratified splits "
                f"need at least 2"
            )
    if 0 < len(records) < TINY_SITE_PATIENTS and labels_required:
        warnings.append(
            f"{csv_path}: tiny site ({len(records)} patients < {TINY_SITE_PATIENTS}); local "
            f"validation metrics will be very noisy"
        )
    return warnings


@dataclass
class _PatientFiles:
    """What the per-patient scan found: feature dims and instance counts, per source;
    slides (or captures) per patient and how many of them carry coordinates."""

    dims: dict[str, int] = field(default_factory=dict)
    dim_file: dict[str, Path] = field(default_factory=dict)
    n_inst: list[int] = field(default_factory=list)
    n_img: list[int] = field(default_factory=list)
    n_feat_ok: int = 0
    n_with_img: int = 0
    n_needs_extraction: int = 0
    n_slides: list[int] = field(default_factory=list)
    slides_with_coords: int = 0
    patients_with_coords: int = 0


def _scan_patient_files(
    records: list[PatientRecord],
    site_dir: Path,
    fdir: Path,
    csv_path: Path,
    expected_dim: int | None,
    errors: list[str],
) -> _PatientFiles:
    """Per patient: check its images and/or read its feature file(s)."""
    found = _PatientFiles()
    for rec in records:
        images = list_patient_images(site_dir, rec.patient_id)
        captures = _check_patient_images(site_dir, rec.patient_id, images, errors)
        if images:
            found.n_with_img += 1
            found.n_img.append(len(images))
        try:
            files = find_patient_features(fdir, rec.patient_id)
        except SiteDataError as exc:  # a file and a slide folder, or an empty folder
            errors.append(str(exc))
            continue
        if files is None:
            if not images:
                errors.append(
                    f"{csv_path} row {rec.row}: patient {rec.patient_id!r} has neither "
                    f"images ({IMAGES_DIR}/{rec.patient_id}/) nor features "
                    f"({fdir.name}/{rec.patient_id}.pt or {fdir.name}/{rec.patient_id}/*.h5); "
                    f"add one or remove the row"
                )
            else:
                found.n_needs_extraction += 1
                found.n_slides.append(captures)
            continue
        try:
            read = read_patient_features(files, expected_dim=expected_dim)
        except SiteDataError as exc:  # FeatureError: names the file and the fix
            errors.append(str(exc))
            continue
        found.n_feat_ok += 1
        found.dims[rec.patient_id] = int(read.features.shape[1])
        found.dim_file[rec.patient_id] = files[0]
        found.n_inst.append(int(read.features.shape[0]))
        n_slides = len(read.slides.names)
        found.n_slides.append(n_slides)
        with_coords = sum(read.slides.has_coords(i) for i in range(n_slides))
        found.slides_with_coords += with_coords
        found.patients_with_coords += with_coords > 0
    return found


def _check_patient_images(
    site_dir: Path, patient_id: str, images: list[Path], errors: list[str]
) -> int:
    """Check a patient's image files and folder layout; returns its number of captures."""
    if not images:
        return 0
    _check_images(images, errors)
    folder = site_dir / IMAGES_DIR / patient_id
    rel = [p.relative_to(folder).as_posix() for p in images]
    problem = image_layout_problem(folder, rel)
    if problem:
        errors.append(problem)
    return len({image_place(r).capture for r in rel})


def _slide_stats(files: _PatientFiles) -> dict[str, Any]:
    """Slides (or captures) per patient and how many carry coordinates: counts only."""
    n = files.n_slides
    return {
        "min": min(n),
        "median": statistics.median(n),
        "max": max(n),
        "total": sum(n),
        "with_coords": files.slides_with_coords,
        "patients_with_coords": files.patients_with_coords,
    }


def _slides_line(s: dict[str, Any]) -> str:
    coords = (
        f"{s['with_coords']} of them with instance coordinates, in "
        f"{s['patients_with_coords']} patients (heatmaps)"
        if s["with_coords"]
        else "none with instance coordinates (no heatmaps)"
    )
    return (
        f"  slides/captures per patient: min {s['min']}, median {s['median']:g}, "
        f"max {s['max']}; {s['total']} in all, {coords}"
    )


def _check_feature_dims(
    files: _PatientFiles, expected_dim: int | None, errors: list[str]
) -> int | None:
    """The site's feature dimension; without ``expected_dim`` the most common one, and
    every file that differs from it is an error."""
    feature_dim = expected_dim
    dims = files.dims
    if dims and feature_dim is None:
        dim_counts = Counter(dims.values())
        feature_dim = dim_counts.most_common(1)[0][0]
        for pid, d in dims.items():
            if d != feature_dim:
                errors.append(
                    f"{files.dim_file[pid]}: feature dimension {d} differs from the site's "
                    f"{feature_dim} ({dim_counts[feature_dim]} of {len(dims)} patients); "
                    f"all patients must use the same encoder"
                )
    return feature_dim


def _stray_file_warnings(records: list[PatientRecord], site_dir: Path, fdir: Path) -> list[str]:
    """Files that belong to nobody usually mean a typo in a patient id."""
    listed = {r.patient_id for r in records}
    warnings = []
    if fdir.is_dir():
        strays = sorted(
            p.name
            for p in fdir.iterdir()
            if (p.suffix.lower() in FEATURE_EXTENSIONS and p.stem not in listed)
            or (p.is_dir() and p.name not in listed)
        )
        if strays:
            warnings.append(
                f"{fdir}: {len(strays)} feature file(s) or slide folder(s) of patients not in "
                f"{PATIENTS_CSV} (e.g. {strays[:3]}); check the patient ids"
            )
        ignored = sorted(
            f"{p.parent.name}/{p.name}"
            for pid in listed
            if (fdir / pid).is_dir()
            for p in (fdir / pid).iterdir()
            if p.is_file() and not p.name.startswith(".")
            and p.suffix.lower() not in FEATURE_EXTENSIONS
        )
        if ignored:
            warnings.append(
                f"{fdir}: {len(ignored)} file(s) in slide folders are not feature files "
                f"({', '.join(FEATURE_EXTENSIONS)}) and are ignored (e.g. {ignored[:3]}); "
                f"convert or remove them"
            )
    img_root = site_dir / IMAGES_DIR
    if img_root.is_dir():
        strays = sorted(p.name for p in img_root.iterdir() if p.is_dir() and p.name not in listed)
        if strays:
            warnings.append(
                f"{img_root}: {len(strays)} image folder(s) of patients not in {PATIENTS_CSV} "
                f"(e.g. {strays[:3]}); check the patient ids"
            )
    return warnings
