"""A data root: the ``sites.yaml`` that names a federation's site folders and their roles
(training or held out), read and written in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from micromil_core.config import ExperimentConfig
from micromil_core.data.layout import (
    SITES_YAML,
)
from micromil_core.errors import ConfigError, SiteDataError, unknown_name
from micromil_core.io import write_text_atomic

ROLES = ("train", "holdout")



SITES_YAML_VERSION = 1



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
            f"`micromil datasets prepare` or write it by hand: {_YAML_HELP}"
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


def classes_declared_for(site_dir: str | Path) -> tuple[str, ...] | None:
    """The classes declared by the data root that lists ``site_dir`` (the sites.yaml of its
    parent folder), or None when the site is not part of one."""
    site = Path(site_dir).resolve()
    if not (site.parent / SITES_YAML).is_file():
        return None
    try:
        root = read_sites_yaml(site.parent, check_paths=False)
    except SiteDataError:
        return None  # a broken sites.yaml is reported by the command that reads it
    listed = any((Path(root.root) / s.path).resolve() == site for s in root.sites)
    return tuple(root.classes) if listed else None


def with_declared_classes(cfg: ExperimentConfig, root: str | Path) -> ExperimentConfig:
    """``cfg`` with ``data.classes`` taken from ``root``'s sites.yaml, so every site's labels
    are checked against the data root's declaration. A config that declares its own
    classes must agree with the data root's."""
    declared = read_sites_yaml(root, check_paths=False).classes
    if not cfg.data.classes:
        return replace(cfg, data=replace(cfg.data, classes=tuple(declared)))
    if tuple(cfg.data.classes) != tuple(declared):
        raise ConfigError(
            f"data.classes {list(cfg.data.classes)} differ from {Path(root) / SITES_YAML}'s classes "
            f"{list(declared)}; drop data.classes (or --classes) or make them the same, in the same order"
        )
    return cfg
