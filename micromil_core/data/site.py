"""One hospital's site folder: parse ``patients.csv``, load bags.

The folder format itself is named in :mod:`micromil_core.data.layout`. This module reads it:

* :func:`load_site` parses ``patients.csv`` strictly into a :class:`SiteData`;
* :func:`load_bags` turns the patients of a site into :class:`~micromil_core.data.bag.Bag`
  objects from their feature files;
* :func:`~micromil_core.data.site_check.check_site` (built on :func:`parse_patients_csv`)
  never raises for data problems: it collects every problem and summary statistics into a
  ``SiteReport`` (what ``micromil check-site`` prints);
* :mod:`~micromil_core.data.data_root` reads and writes a data root (``ROOT/sites.yaml``)
  that says which site folders train and which are held out.

Row numbers in every message are the line numbers of ``patients.csv`` as a text editor shows
them: the header is row 1, so the first patient is row 2.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from micromil_core.data.bag import UNLABELLED, Bag
from micromil_core.data.layout import (
    FEATURE_EXTENSIONS,
    FEATURES_DIR,
    IMAGES_DIR,
    OPTIONAL_COLUMNS,
    PATIENTS_CSV,
    REQUIRED_COLUMNS,
    SPLITS,
    find_patient_features,
)
from micromil_core.data.slides import read_patient_features
from micromil_core.errors import ConfigError, SiteDataError

log = logging.getLogger(__name__)


MAX_SHOWN = 25  # problems listed in one message; the rest are counted

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


def check_vocabulary(name: str, values: Sequence[str] | None) -> tuple[str, ...] | None:
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


def parse_patients_csv(
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
    text = _read_patients_text(site_dir, csv_path, problems)
    if text is None:
        return None
    rows = _numbered_rows(text)
    header = _read_header(rows, csv_path, labels_required, problems)
    if header is None:
        return None
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    extra_columns = [c for c in header if c not in known]
    records = _read_records(
        rows, header, csv_path, classes, fine_classes, labels_required, problems
    )
    out_classes = (
        classes if classes is not None else class_order(r.label for r in records if r.label)
    )
    if fine_classes is not None:
        out_fine = fine_classes
    else:
        fines = [r.fine_label for r in records if r.fine_label is not None]
        out_fine = class_order(fines) if fines else None
    return _Parsed(records, out_classes, out_fine, extra_columns)


def _read_patients_text(site_dir: Path, csv_path: Path, problems: list[str]) -> str | None:
    if not site_dir.is_dir():
        problems.append(f"{site_dir}: site folder not found; {_CSV_HELP}")
        return None
    if not csv_path.is_file():
        problems.append(f"{csv_path} not found; {_CSV_HELP}")
        return None
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        return csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{csv_path}: cannot read ({exc}); save it as UTF-8 text")
        return None


def _numbered_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """The CSV rows, each with the line it ends on (a quoted cell may span lines)."""
    reader = csv.reader(text.splitlines())
    for raw in reader:
        yield reader.line_num, raw


def _read_header(
    rows: Iterator[tuple[int, list[str]]],
    csv_path: Path,
    labels_required: bool,
    problems: list[str],
) -> list[str] | None:
    """The first non-blank row, stripped; None (with a problem) when it is unusable."""
    header: list[str] | None = None
    for row, raw in rows:
        if any(cell.strip() for cell in raw):
            header = [c.strip() for c in raw]
            header_row = row
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
    return header


def _read_records(
    rows: Iterator[tuple[int, list[str]]],
    header: list[str],
    csv_path: Path,
    classes: tuple[str, ...] | None,
    fine_classes: tuple[str, ...] | None,
    labels_required: bool,
    problems: list[str],
) -> list[PatientRecord]:
    """The valid patient rows after the header; every bad row becomes a problem."""
    col = {name: header.index(name) for name in header}
    records: list[PatientRecord] = []
    first_row: dict[str, int] = {}
    n_rows = 0
    for row, raw in rows:
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
        if fine is not None and fine == "":
            fine = None  # a fine label may be unknown for some patients
        found = [
            _patient_id_problem(pid, row, first_row),
            _label_problem(pid, label, classes, labels_required),
            _split_problem(split),
            _fine_label_problem(fine, fine_classes),
        ]
        row_problems = [f"{csv_path} row {row}: {p}" for p in found if p]
        problems.extend(row_problems)
        if not row_problems:
            records.append(PatientRecord(pid, label, split, fine, row))
    if n_rows == 0:
        problems.append(f"{csv_path} has a header but no patient rows; {_CSV_HELP}")
    return records


def _patient_id_problem(pid: str, row: int, first_row: dict[str, int]) -> str | None:
    """What is wrong with a row's patient id; a good id is remembered in ``first_row``."""
    if not pid:
        return "empty patient_id"
    why = _bad_patient_id(pid)
    if why:
        return (
            f"patient_id {pid!r} {why}; ids name the folder "
            f"images/<id>/ and the file features/<id>.pt, so use a plain name"
        )
    if pid in first_row:
        return (
            f"duplicate patient_id {pid!r} (first at row "
            f"{first_row[pid]}); one row per patient"
        )
    first_row[pid] = row
    return None


def _label_problem(
    pid: str, label: str, classes: tuple[str, ...] | None, labels_required: bool
) -> str | None:
    if not label and labels_required:
        return (
            f"empty label for patient {pid!r}; fill it in, or score "
            f"patients without a diagnosis with `micromil predict`"
        )
    if label and classes is not None and label not in classes:
        unknown_hint = "" if labels_required else "; leave it empty when not known"
        return f"label {label!r} not in {_fmt_set(classes)}{unknown_hint}"
    return None


def _split_problem(split: str | None) -> str | None:
    if split is not None and split not in SPLITS:
        shown = "empty split" if not split else f"split {split!r}"
        return (
            f"{shown} not in {_fmt_set(SPLITS)}; fix the value or "
            f"remove the split column to use cross-validation"
        )
    return None


def _fine_label_problem(fine: str | None, fine_classes: tuple[str, ...] | None) -> str | None:
    if fine is not None and fine_classes is not None and fine not in fine_classes:
        return f"fine_label {fine!r} not in {_fmt_set(fine_classes)}"
    return None


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
    classes_t = check_vocabulary("classes", classes)
    fine_t = check_vocabulary("fine_classes", fine_classes)
    problems: list[str] = []
    parsed = parse_patients_csv(site_dir, classes_t, fine_t, problems, labels_required)
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
        feature_dir: where ``<patient_id>.{pt,npy,h5}`` (or ``<patient_id>/``, one file
            per slide) live; default ``SITE/features`` (or a cache folder of ``images/``).
        expected_dim: required feature dimension; when None the first bag's dimension is
            required of all the others.

    Shapes:
        each bag.features: (N_i, D) float32
        each bag.scales: (N_i,) int64 when the files store scale indices (multi-scale
            sites, see docs/multiscale.md), else None; each bag.slides: see ``Slides``

    Raises:
        SiteDataError: a patient has no feature file (or a file and a slide folder), or
            is not in ``patients.csv``.
        FeatureError: a feature file is unreadable, empty, non-finite or of the wrong D.
    """
    fdir = Path(feature_dir) if feature_dir is not None else site.path / FEATURES_DIR
    bags: list[Bag] = []
    dim = expected_dim
    for rec in site.records(patient_ids):
        files = find_patient_features(fdir, rec.patient_id)
        if files is None:
            where = (
                f"patient {rec.patient_id!r} ({site.path / PATIENTS_CSV} row {rec.row}) has no "
                f"feature file {fdir / rec.patient_id}{{{','.join(FEATURE_EXTENSIONS)}}} "
                f"(nor a folder {rec.patient_id}/ of slide files)"
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
        read = read_patient_features(files, expected_dim=dim)
        dim = int(read.features.shape[1])
        bags.append(
            Bag(
                patient_id=rec.patient_id,
                features=read.features,
                label=site.label_index(rec),
                fine_label=site.fine_label_index(rec),
                scales=read.scales,
                slides=read.slides,
            )
        )
    return bags
