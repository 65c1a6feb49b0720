"""One hospital's site folder: parse ``patients.csv``, load bags, check a site, data roots.

The folder format itself is named in :mod:`micromil_core.data.layout`. This module reads it:

* :func:`load_site` parses ``patients.csv`` strictly into a :class:`SiteData`;
* :func:`load_bags` turns the patients of a site into :class:`~micromil_core.data.bag.Bag`
  objects from their feature files;
* :func:`check_site` never raises for data problems: it collects every problem and summary
  statistics into a :class:`SiteReport` (what ``micromil check-site`` prints);
* :func:`read_sites_yaml` / :func:`write_sites_yaml` handle a data root (``ROOT/sites.yaml``)
  that says which site folders train and which are held out.

Row numbers in every message are the line numbers of ``patients.csv`` as a text editor shows
them: the header is row 1, so the first patient is row 2.
"""

from __future__ import annotations

import csv
import logging
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from micromil_core.data.bag import UNLABELLED, Bag
from micromil_core.data.features import read_feature_file, read_features_and_scales
from micromil_core.data.layout import (
    FEATURE_EXTENSIONS,
    FEATURES_DIR,
    IMAGES_DIR,
    OPTIONAL_COLUMNS,
    PATIENTS_CSV,
    REQUIRED_COLUMNS,
    SITES_YAML,
    SPLITS,
    find_feature_file,
    list_patient_images,
)
from micromil_core.errors import ConfigError, FeatureError, SiteDataError, unknown_name
from micromil_core.io import write_text_atomic

log = logging.getLogger(__name__)

ROLES = ("train", "holdout")
SITES_YAML_VERSION = 1
# Below this many patients a site's local validation metrics are mostly noise.
TINY_SITE_PATIENTS = 10
# Error lists are kept whole in the report; format() shows this many per section.
MAX_SHOWN = 25

_CSV_HELP = (
    f"a site folder needs {PATIENTS_CSV} with header "
    f"'patient_id,label[,split][,fine_label]' and one row per patient"
)


@dataclass(frozen=True)
class PatientRecord:
    """One row of ``patients.csv``.

    ``row`` is the 1-based line number in the file (header = row 1), kept so that later
    errors about this patient can point back at the line to fix.
    """

    patient_id: str
    label: str
    split: str | None
    fine_label: str | None
    row: int


@dataclass
class SiteData:
    """A parsed site folder: its patients and the class vocabulary their labels map into."""

    path: Path
    name: str
    patients: list[PatientRecord]
    classes: tuple[str, ...]
    fine_classes: tuple[str, ...] | None = None

    @property
    def patient_ids(self) -> list[str]:
        return [p.patient_id for p in self.patients]

    @property
    def has_splits(self) -> bool:
        """True when ``patients.csv`` has a split column (every row then has a split)."""
        return any(p.split is not None for p in self.patients)

    def label_index(self, record: PatientRecord) -> int:
        """Class index of a patient's label in ``classes``; ``UNLABELLED`` when it has none."""
        if not record.label:  # only sites loaded with labels_required=False have these
            return UNLABELLED
        return self._index_in(self.classes, record.label, "label", record.row)

    def fine_label_index(self, record: PatientRecord) -> int | None:
        """Index of a patient's fine label in ``fine_classes``; None when it has none."""
        if record.fine_label is None or self.fine_classes is None:
            return None
        return self._index_in(self.fine_classes, record.fine_label, "fine_label", record.row)

    def _index_in(self, vocabulary: Sequence[str], value: str, column: str, row: int) -> int:
        try:
            return vocabulary.index(value)
        except ValueError:
            raise SiteDataError(
                f"{self.path / PATIENTS_CSV} row {row}: {column} {value!r} not in "
                f"{_fmt_set(vocabulary)}"
            ) from None

    def labels(self, patient_ids: Iterable[str] | None = None) -> list[int]:
        """Class indices of the given patients (default: all, in ``patients.csv`` order)."""
        return [self.label_index(r) for r in self.records(patient_ids)]

    def records(self, patient_ids: Iterable[str] | None = None) -> list[PatientRecord]:
        """The records of the given patient ids, in the order given (default: all)."""
        if patient_ids is None:
            return list(self.patients)
        by_id = {p.patient_id: p for p in self.patients}
        out = []
        for pid in patient_ids:
            if pid not in by_id:
                raise SiteDataError(
                    f"patient {pid!r} is not listed in {self.path / PATIENTS_CSV}; "
                    f"add a row for it or drop it from the requested ids"
                )
            out.append(by_id[pid])
        return out

    def split_ids(self, split: str) -> list[str]:
        """Patient ids of one split (``train``, ``val`` or ``test``), in file order."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if not self.has_splits:
            raise SiteDataError(
                f"{self.path / PATIENTS_CSV} has no split column, so split {split!r} is "
                f"undefined; add a 'split' column (train|val|test) or use cross-validation"
            )
        return [p.patient_id for p in self.patients if p.split == split]


# ---------------------------------------------------------------------------------------
# patients.csv


def _fmt_set(values: Iterable[str]) -> str:
    return "{" + ", ".join(values) + "}"


def class_order(values: Iterable[str]) -> tuple[str, ...]:
    """Sorted unique values; numerically when every value is an integer ('2' < '10')."""
    unique = set(values)
    try:
        return tuple(sorted(unique, key=int))
    except ValueError:
        return tuple(sorted(unique))


def _check_vocabulary(name: str, values: Sequence[str] | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    vocab = tuple(str(v) for v in values)
    dupes = sorted(v for v, c in Counter(vocab).items() if c > 1)
    if dupes or not vocab or any(not v for v in vocab):
        raise ConfigError(
            f"{name} must be a non-empty list of distinct non-empty names, got {list(vocab)}"
        )
    return vocab


def _bad_patient_id(pid: str) -> str | None:
    """Why a patient id cannot name a file/folder, or None if it is fine."""
    # The id becomes images/<id>/ and features/<id>.pt: it must stay inside the site folder.
    if "/" in pid or "\\" in pid:
        return "contains a path separator"
    if ".." in pid or pid == ".":
        return "contains '..' or is '.'"
    if "\0" in pid:
        return "contains a NUL character"
    return None


@dataclass
class _Parsed:
    records: list[PatientRecord]
    classes: tuple[str, ...]
    fine_classes: tuple[str, ...] | None
    extra_columns: list[str]


def _parse_patients_csv(
    site_dir: Path,
    classes: tuple[str, ...] | None,
    fine_classes: tuple[str, ...] | None,
    problems: list[str],
    labels_required: bool = True,
) -> _Parsed | None:
    """Parse ``patients.csv``, appending every problem found to ``problems``.

    With ``labels_required`` False (scoring new patients) the label column may be absent
    and a label cell empty: such patients get the label ``""`` (unknown).
    Returns None when the file cannot be parsed at all (missing, empty, bad header).
    """
    csv_path = site_dir / PATIENTS_CSV
    if not site_dir.is_dir():
        problems.append(f"{site_dir}: site folder not found; {_CSV_HELP}")
        return None
    if not csv_path.is_file():
        problems.append(f"{csv_path} not found; {_CSV_HELP}")
        return None
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{csv_path}: cannot read ({exc}); save it as UTF-8 text")
        return None

    reader = csv.reader(text.splitlines())
    header: list[str] | None = None
    for raw in reader:
        if any(cell.strip() for cell in raw):
            header = [c.strip() for c in raw]
            header_row = reader.line_num
            break
    if header is None:
        problems.append(f"{csv_path} is empty; {_CSV_HELP}")
        return None
    dupes = sorted(c for c, n in Counter(header).items() if n > 1)
    if dupes:
        problems.append(f"{csv_path} row {header_row}: duplicate column(s) {dupes} in header")
        return None
    required = REQUIRED_COLUMNS if labels_required else ("patient_id",)
    missing = [c for c in required if c not in header]
    if missing:
        problems.append(
            f"{csv_path} row {header_row}: missing required column(s) {missing}; header is "
            f"{header}, expected 'patient_id,label[,split][,fine_label]'"
            + (
                "; to score patients without a diagnosis use `micromil predict`"
                if "label" in missing
                else ""
            )
        )
        return None
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    extra_columns = [c for c in header if c not in known]
    col = {name: header.index(name) for name in header}

    records: list[PatientRecord] = []
    first_row: dict[str, int] = {}
    n_rows = 0
    for raw in reader:
        row = reader.line_num
        if not any(cell.strip() for cell in raw):
            continue  # blank lines (often trailing) carry no patient
        n_rows += 1
        if len(raw) != len(header):
            problems.append(
                f"{csv_path} row {row}: {len(raw)} fields but the header has {len(header)}; "
                f"quote values that contain commas"
            )
            continue
        cells = [c.strip() for c in raw]
        pid = cells[col["patient_id"]]
        label = cells[col["label"]] if "label" in col else ""
        split = cells[col["split"]] if "split" in col else None
        fine = cells[col["fine_label"]] if "fine_label" in col else None
        ok = True
        if not pid:
            problems.append(f"{csv_path} row {row}: empty patient_id")
            ok = False
        else:
            why = _bad_patient_id(pid)
            if why:
                problems.append(
                    f"{csv_path} row {row}: patient_id {pid!r} {why}; ids name the folder "
                    f"images/<id>/ and the file features/<id>.pt, so use a plain name"
                )
                ok = False
            elif pid in first_row:
                problems.append(
                    f"{csv_path} row {row}: duplicate patient_id {pid!r} (first at row "
                    f"{first_row[pid]}); one row per patient"
                )
                ok = False
            else:
                first_row[pid] = row
        if not label and labels_required:
            problems.append(
                f"{csv_path} row {row}: empty label for patient {pid!r}; fill it in, or score "
                f"patients without a diagnosis with `micromil predict`"
            )
            ok = False
        elif label and classes is not None and label not in classes:
            unknown_hint = "" if labels_required else "; leave it empty when not known"
            problems.append(
                f"{csv_path} row {row}: label {label!r} not in {_fmt_set(classes)}{unknown_hint}"
            )
            ok = False
        if split is not None and split not in SPLITS:
            shown = "empty split" if not split else f"split {split!r}"
            problems.append(
                f"{csv_path} row {row}: {shown} not in {_fmt_set(SPLITS)}; fix the value or "
                f"remove the split column to use cross-validation"
            )
            ok = False
        if fine is not None and fine == "":
            fine = None  # a fine label may be unknown for some patients
        if fine is not None and fine_classes is not None and fine not in fine_classes:
            problems.append(
                f"{csv_path} row {row}: fine_label {fine!r} not in {_fmt_set(fine_classes)}"
            )
            ok = False
        if ok:
            records.append(PatientRecord(pid, label, split, fine, row))

    if n_rows == 0:
        problems.append(f"{csv_path} has a header but no patient rows; {_CSV_HELP}")
    out_classes = (
        classes if classes is not None else class_order(r.label for r in records if r.label)
    )
    if fine_classes is not None:
        out_fine = fine_classes
    else:
        fines = [r.fine_label for r in records if r.fine_label is not None]
        out_fine = class_order(fines) if fines else None
    return _Parsed(records, out_classes, out_fine, extra_columns)


def _problems_error(problems: list[str]) -> SiteDataError:
    """One error carrying every problem, so a user fixes them all in one pass."""
    if len(problems) == 1:
        return SiteDataError(problems[0])
    shown = problems[:MAX_SHOWN]
    more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    return SiteDataError(f"{len(problems)} problems in site data:\n  " + "\n  ".join(shown) + more)


def load_site(
    path: str | Path,
    classes: Sequence[str] | None = None,
    fine_classes: Sequence[str] | None = None,
    labels_required: bool = True,
) -> SiteData:
    """Parse a site folder's ``patients.csv`` strictly.

    Args:
        path: the site folder.
        classes: the federation's class names in index order. When None, the site's own
            sorted unique labels (numerically sorted when all labels are integers); pass the
            data root's classes so that every site maps labels to the same indices.
        fine_classes: the same for the optional ``fine_label`` column.
        labels_required: False to score new patients (``micromil predict``): the label
            column may then be missing or empty, and such bags get ``UNLABELLED``.

    Row numbers in errors are line numbers of the file: header = row 1, first patient = 2.
    Blank lines are skipped; surrounding whitespace in cells is ignored; columns other than
    ``patient_id, label, split, fine_label`` are ignored (``check_site`` warns about them).
    An empty ``fine_label`` means "unknown"; an empty ``split`` is an error.

    Raises:
        SiteDataError: listing every problem found (missing file or column, empty file,
            duplicate or unsafe patient ids, empty labels, unknown split values, labels
            outside ``classes``).
        ConfigError: ``classes``/``fine_classes`` themselves are malformed.
    """
    site_dir = Path(path)
    classes_t = _check_vocabulary("classes", classes)
    fine_t = _check_vocabulary("fine_classes", fine_classes)
    problems: list[str] = []
    parsed = _parse_patients_csv(site_dir, classes_t, fine_t, problems, labels_required)
    if parsed is None or problems:
        raise _problems_error(problems)
    return SiteData(
        path=site_dir,
        name=site_dir.resolve().name,
        patients=parsed.records,
        classes=parsed.classes,
        fine_classes=parsed.fine_classes,
    )


# ---------------------------------------------------------------------------------------
# bags


def load_bags(
    site: SiteData,
    patient_ids: Iterable[str] | None = None,
    feature_dir: str | Path | None = None,
    expected_dim: int | None = None,
) -> list[Bag]:
    """Load the bags of some (default: all) patients of a site from their feature files.

    Args:
        site: from :func:`load_site`.
        patient_ids: which patients, in the order wanted; default all, in file order.
        feature_dir: where ``<patient_id>.{pt,npy,h5}`` live; default ``SITE/features``
            (pass a feature cache folder for features extracted from ``images/``).
        expected_dim: required feature dimension; when None the first bag's dimension is
            required of all the others.

    Shapes:
        each bag.features: (N_i, D) float32
        each bag.scales: (N_i,) int64 when the file stores scale indices (multi-scale
            sites, see docs/multiscale.md), else None

    Raises:
        SiteDataError: a patient has no feature file or is not in ``patients.csv``.
        FeatureError: a feature file is unreadable, empty, non-finite or of the wrong D.
    """
    fdir = Path(feature_dir) if feature_dir is not None else site.path / FEATURES_DIR
    bags: list[Bag] = []
    dim = expected_dim
    for rec in site.records(patient_ids):
        fpath = find_feature_file(fdir, rec.patient_id)
        if fpath is None:
            where = (
                f"patient {rec.patient_id!r} ({site.path / PATIENTS_CSV} row {rec.row}) has no "
                f"feature file {fdir / rec.patient_id}{{{','.join(FEATURE_EXTENSIONS)}}}"
            )
            if feature_dir is None and (site.path / IMAGES_DIR / rec.patient_id).is_dir():
                # An image site read without an encoder: the images are there, only the
                # encoder was not named (extract alone fills a cache this call does not read).
                raise SiteDataError(
                    f"{where}, but it has images under {IMAGES_DIR}/{rec.patient_id}/; pass "
                    f"`--encoder NAME` (e.g. `--encoder histo-texture`; `micromil encoders` "
                    f"lists them) or set data.encoder in the config, so that its images are "
                    f"encoded and cached"
                )
            raise SiteDataError(
                f"{where}; either add features/{rec.patient_id}.pt with its (N, D) instance "
                f"features, or put its images under {IMAGES_DIR}/{rec.patient_id}/ and pass "
                f"`--encoder NAME` to encode them"
            )
        feats, scales = read_features_and_scales(fpath, expected_dim=dim)
        dim = int(feats.shape[1])
        bags.append(
            Bag(
                patient_id=rec.patient_id,
                features=feats,
                label=site.label_index(rec),
                fine_label=site.fine_label_index(rec),
                scales=scales,
            )
        )
    return bags


# ---------------------------------------------------------------------------------------
# check_site


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
    classes_t = _check_vocabulary("classes", classes)
    parsed = _parse_patients_csv(site_dir, classes_t, None, report.errors, labels_required)
    if parsed is None:
        return report
    records = parsed.records
    fdir = Path(feature_dir) if feature_dir is not None else site_dir / FEATURES_DIR
    csv_path = site_dir / PATIENTS_CSV

    per_class = Counter(r.label for r in records)
    stats: dict[str, Any] = {
        "n_patients": len(records),
        "classes": list(parsed.classes),
        "patients_per_class": {c: per_class.get(c, 0) for c in parsed.classes},
        "patients_per_split": None,
    }
    if not labels_required:
        stats["unlabelled"] = sum(1 for r in records if not r.label)
    has_splits = any(r.split is not None for r in records)
    if has_splits:
        per_split = Counter(r.split for r in records)
        stats["patients_per_split"] = {s: per_split.get(s, 0) for s in SPLITS}
        stats["patients_per_split_class"] = {
            s: {c: sum(1 for r in records if r.split == s and r.label == c) for c in parsed.classes}
            for s in SPLITS
        }
        if per_split.get("val", 0) == 0:
            report.warnings.append(
                f"{csv_path}: split column has no 'val' patients; a validation set will be "
                f"carved from the train patients (train.val_fraction), or mark some as val"
            )
    if parsed.extra_columns:
        report.warnings.append(f"{csv_path}: ignoring unknown column(s) {parsed.extra_columns}")
    present = [c for c in parsed.classes if per_class.get(c, 0) > 0]
    if records and len(present) < 2 and labels_required:
        report.warnings.append(
            f"{csv_path}: single-class site (only {present}); it can train in a federation "
            f"but local AUC and balanced accuracy are undefined"
        )
    for c in parsed.classes if labels_required else ():
        if 0 < per_class.get(c, 0) < 2:
            report.warnings.append(
                f"{csv_path}: class {c!r} has only {per_class[c]} patient; stratified splits "
                f"need at least 2"
            )
    if 0 < len(records) < TINY_SITE_PATIENTS and labels_required:
        report.warnings.append(
            f"{csv_path}: tiny site ({len(records)} patients < {TINY_SITE_PATIENTS}); local "
            f"validation metrics will be very noisy"
        )

    # Per patient: features and/or images.
    dims: dict[str, int] = {}
    dim_file: dict[str, Path] = {}
    n_inst: list[int] = []
    n_img: list[int] = []
    n_feat_ok = n_with_img = n_needs_extraction = 0
    for rec in records:
        fpath = find_feature_file(fdir, rec.patient_id)
        images = list_patient_images(site_dir, rec.patient_id)
        if images:
            n_with_img += 1
            n_img.append(len(images))
            _check_images(images, report.errors)
        if fpath is None:
            if not images:
                report.errors.append(
                    f"{csv_path} row {rec.row}: patient {rec.patient_id!r} has neither "
                    f"images ({IMAGES_DIR}/{rec.patient_id}/) nor features "
                    f"({fdir.name}/{rec.patient_id}.pt); add one or remove the row"
                )
            else:
                n_needs_extraction += 1
            continue
        try:
            feats = read_feature_file(fpath, expected_dim=expected_dim)
        except FeatureError as exc:
            report.errors.append(str(exc))
            continue
        n_feat_ok += 1
        dims[rec.patient_id] = int(feats.shape[1])
        dim_file[rec.patient_id] = fpath
        n_inst.append(int(feats.shape[0]))

    feature_dim = expected_dim
    if dims and feature_dim is None:
        dim_counts = Counter(dims.values())
        feature_dim = dim_counts.most_common(1)[0][0]
        for pid, d in dims.items():
            if d != feature_dim:
                report.errors.append(
                    f"{dim_file[pid]}: feature dimension {d} differs from the site's "
                    f"{feature_dim} ({dim_counts[feature_dim]} of {len(dims)} patients); "
                    f"all patients must use the same encoder"
                )

    # Files that belong to nobody usually mean a typo in a patient id.
    listed = {r.patient_id for r in records}
    if fdir.is_dir():
        strays = sorted(
            p.name
            for p in fdir.iterdir()
            if p.suffix.lower() in FEATURE_EXTENSIONS and p.stem not in listed
        )
        if strays:
            report.warnings.append(
                f"{fdir}: {len(strays)} feature file(s) of patients not in {PATIENTS_CSV} "
                f"(e.g. {strays[:3]}); check the patient ids"
            )
    img_root = site_dir / IMAGES_DIR
    if img_root.is_dir():
        strays = sorted(p.name for p in img_root.iterdir() if p.is_dir() and p.name not in listed)
        if strays:
            report.warnings.append(
                f"{img_root}: {len(strays)} image folder(s) of patients not in {PATIENTS_CSV} "
                f"(e.g. {strays[:3]}); check the patient ids"
            )

    source, counts = ("features", n_inst) if n_inst else ("images", n_img)
    if counts:
        stats["instances"] = {
            "source": source,
            "min": min(counts),
            "mean": sum(counts) / len(counts),
            "max": max(counts),
        }
    stats.update(
        feature_dim=feature_dim,
        has_features=n_feat_ok > 0,
        has_images=n_with_img > 0,
        n_with_features=n_feat_ok,
        n_with_images=n_with_img,
        n_needs_extraction=n_needs_extraction,
    )
    report.stats = stats
    return report


# ---------------------------------------------------------------------------------------
# data root: sites.yaml


@dataclass(frozen=True)
class SiteEntry:
    """One site of a data root. ``path`` is absolute once read."""

    name: str
    role: str
    path: Path
    n_patients: int | None = None


@dataclass
class DataRoot:
    """A data root: several site folders plus ``sites.yaml`` describing them.

    ``extra`` keeps any other top-level keys of ``sites.yaml`` (source, split policy, ...)
    so that reading and re-writing a file loses nothing.
    """

    root: Path
    dataset: str
    classes: tuple[str, ...]
    sites: list[SiteEntry]
    fine_classes: tuple[str, ...] | None = None
    feature_dim: int | None = None
    partition: str | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_sites(self) -> list[Path]:
        return [s.path for s in self.sites if s.role == "train"]

    @property
    def holdout_sites(self) -> list[Path]:
        return [s.path for s in self.sites if s.role == "holdout"]

    def site(self, name: str) -> SiteEntry:
        for s in self.sites:
            if s.name == name:
                return s
        raise unknown_name("site", name, [s.name for s in self.sites])

    def to_dict(self) -> dict[str, Any]:
        """The ``sites.yaml`` content; site paths relative to the root where possible."""
        root = Path(self.root).resolve()
        sites = []
        for s in self.sites:
            p = Path(s.path)
            if not p.is_absolute():
                # Either already relative to the root ("site-0") or, under a relative
                # root, relative to the working directory ("data/ucsb/site-0").
                try:
                    p = p.relative_to(Path(self.root))
                except ValueError:
                    pass
                rel = str(p)
            else:
                try:
                    rel = str(p.resolve().relative_to(root))
                except ValueError:
                    rel = str(p)  # a site outside the root keeps its absolute path
            entry: dict[str, Any] = {"name": s.name, "role": s.role, "path": rel}
            if s.n_patients is not None:
                entry["n_patients"] = s.n_patients
            sites.append(entry)
        out: dict[str, Any] = {
            "format_version": SITES_YAML_VERSION,
            "dataset": self.dataset,
            "classes": list(self.classes),
            "fine_classes": list(self.fine_classes) if self.fine_classes is not None else None,
            "feature_dim": self.feature_dim,
            "partition": self.partition,
            "seed": self.seed,
            "sites": sites,
        }
        # Extra keys never shadow the schema's own.
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out


_YAML_HELP = (
    "sites.yaml needs at least 'classes: [neg, pos]' and 'sites:' with entries "
    "'{name: site-0, role: train|holdout, path: site-0}'"
)


def _data_root_from_dict(root: Path, data: Any, where: str) -> DataRoot:
    """Validate a parsed ``sites.yaml`` mapping; ``where`` names the file in errors."""
    if not isinstance(data, Mapping):
        raise SiteDataError(f"{where}: expected a mapping at top level; {_YAML_HELP}")
    missing = [k for k in ("classes", "sites") if k not in data]
    if missing:
        raise SiteDataError(f"{where}: missing key(s) {missing}; {_YAML_HELP}")
    classes = data["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or len(set(map(str, classes))) != len(classes)
    ):
        raise SiteDataError(
            f"{where}: 'classes' must be a list of at least 2 distinct names, got {classes!r}"
        )
    fine = data.get("fine_classes")
    if fine is not None and not isinstance(fine, list):
        raise SiteDataError(f"{where}: 'fine_classes' must be a list or null, got {fine!r}")
    dim = data.get("feature_dim")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0):
        raise SiteDataError(
            f"{where}: 'feature_dim' must be a positive integer or null, got {dim!r}"
        )
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise SiteDataError(f"{where}: 'seed' must be an integer or null, got {seed!r}")
    raw_sites = data["sites"]
    if not isinstance(raw_sites, list) or not raw_sites:
        raise SiteDataError(f"{where}: 'sites' must be a non-empty list; {_YAML_HELP}")
    sites: list[SiteEntry] = []
    seen: set[str] = set()
    for i, s in enumerate(raw_sites):
        if not isinstance(s, Mapping) or "name" not in s:
            raise SiteDataError(
                f"{where}: sites[{i}] must be a mapping with a 'name'; {_YAML_HELP}"
            )
        name = str(s["name"])
        role = s.get("role", "train")
        if role not in ROLES:
            raise SiteDataError(
                f"{where}: site {name!r} has role {role!r}; valid roles: {', '.join(ROLES)}"
            )
        if name in seen:
            raise SiteDataError(f"{where}: duplicate site name {name!r}")
        seen.add(name)
        p = Path(str(s.get("path", name)))
        n = s.get("n_patients")
        sites.append(
            SiteEntry(
                name, role, p if p.is_absolute() else root / p, int(n) if n is not None else None
            )
        )
    if not any(s.role == "train" for s in sites):
        raise SiteDataError(f"{where}: no site has role 'train'; at least one must train")
    known = {
        "format_version",
        "dataset",
        "classes",
        "fine_classes",
        "feature_dim",
        "partition",
        "seed",
        "sites",
    }
    return DataRoot(
        root=root,
        dataset=str(data.get("dataset", root.name)),
        classes=tuple(str(c) for c in classes),
        sites=sites,
        fine_classes=tuple(str(c) for c in fine) if fine is not None else None,
        feature_dim=dim,
        partition=None if data.get("partition") is None else str(data["partition"]),
        seed=seed,
        extra={k: v for k, v in data.items() if k not in known},
    )


def read_sites_yaml(root: str | Path, check_paths: bool = True) -> DataRoot:
    """Read ``ROOT/sites.yaml``.

    Schema (``format_version: 1``)::

        dataset: musk1                  # free-form name
        classes: [negative, positive]   # index order of bag labels, shared by all sites
        fine_classes: null              # or a list
        feature_dim: 166                # null for image-only roots (depends on the encoder)
        partition: iid                  # how the sites were made (see partition.py)
        seed: 0
        sites:
          - {name: site-0, role: train, path: site-0, n_patients: 46}
          - {name: site-1, role: holdout, path: site-1, n_patients: 46}
        # any other keys (source, split_policy, modality, ...) are kept in DataRoot.extra

    Raises:
        SiteDataError: the file is missing or malformed, or (``check_paths``) a site folder
            it names does not exist.
    """
    root = Path(root)
    yml = root / SITES_YAML
    if not yml.is_file():
        raise SiteDataError(
            f"{yml} not found; a data root lists its site folders there. Create it with "
            f"`micromil prepare` or write it by hand: {_YAML_HELP}"
        )
    try:
        data = yaml.safe_load(yml.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SiteDataError(f"{yml}: not valid YAML ({exc}); {_YAML_HELP}") from exc
    info = _data_root_from_dict(root, data, str(yml))
    if check_paths:
        missing = [str(s.path) for s in info.sites if not s.path.is_dir()]
        if missing:
            raise SiteDataError(
                f"{yml}: site folder(s) not found: {missing}; fix the 'path' entries "
                f"(relative to {root}) or restore the folders"
            )
    return info


def write_sites_yaml(root: str | Path, info: DataRoot | Mapping[str, Any]) -> Path:
    """Validate ``info`` and write it atomically to ``ROOT/sites.yaml``.

    ``info`` is a :class:`DataRoot` or a mapping with the schema of :func:`read_sites_yaml`.
    """
    root = Path(root)
    if isinstance(info, DataRoot):
        data = info.to_dict()
    else:
        data = dict(info)
    # Round-trip through the validator so a bad file is never written.
    validated = _data_root_from_dict(root, data, f"sites.yaml for {root}")
    validated.root = root
    text = yaml.safe_dump(validated.to_dict(), sort_keys=False, default_flow_style=None)
    return write_text_atomic(root / SITES_YAML, text)
