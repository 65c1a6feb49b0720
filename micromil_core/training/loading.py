"""Site folders to bags ready for a model: features located, bags loaded, splits made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from micromil_core.config import DataConfig, TrainConfig
from micromil_core.data.bag import Bag
from micromil_core.data.data_root import classes_declared_for
from micromil_core.data.layout import FEATURES_DIR, PATIENTS_CSV
from micromil_core.data.site import SiteData, class_order, load_bags, load_site
from micromil_core.data.site_check import rare_label_problems
from micromil_core.data.splits import train_val_split
from micromil_core.errors import SiteDataError


@dataclass
class SiteBags:
    """One site's records and its bags (features loaded, not yet standardised)."""

    site: SiteData
    bags: list[Bag]
    feature_dir: Path

    def by_split(self, split: str) -> list[Bag]:
        ids = set(self.site.split_ids(split))
        return [b for b in self.bags if b.patient_id in ids]



def feature_dir_for(
    site_path: Path,
    patient_ids: Sequence[str],
    data_cfg: DataConfig,
    device: torch.device,
    progress: bool = False,
) -> Path:
    """Precomputed SITE/features, or the cache of features extracted with an encoder
    (``data_cfg.extraction_options()``: the options of ``micromil extract``, so both build
    and reuse the same cache)."""
    spec = data_cfg.encoder
    if not spec:
        return Path(site_path) / FEATURES_DIR
    from micromil_core.encoders import extract_site_features, get_encoder

    enc = get_encoder(spec, device=str(device), **data_cfg.encoder_options())
    result = extract_site_features(
        site_path, list(patient_ids), enc, progress=progress, **data_cfg.extraction_options()
    )
    return result.feature_dir



def load_sites(
    site_paths: Sequence[str | Path],
    data_cfg: DataConfig,
    device: torch.device,
    classes: Sequence[str] | None = None,
    expected_dim: int | None = None,
    progress: bool = False,
    fine_classes: Sequence[str] | None = None,
    labels_required: bool = True,
) -> list[SiteBags]:
    """Load several sites with one shared class list and one feature dimension.

    Classes are ``classes``, else the declared ``data_cfg.classes``, else the sorted union
    of the sites' labels (then a label only one patient carries is refused as a likely
    typo); fine classes likewise. Every site indexes classes the same way; a site whose
    features differ in dimension is named in the error.
    """
    paths = [Path(p) for p in site_paths]
    if not paths:
        raise SiteDataError("no site folder given; pass at least one --data SITE")
    if classes is None and data_cfg.classes:
        classes = list(data_cfg.classes)
    if classes is None:  # sites of one data root: its sites.yaml declares the classes
        declared = {classes_declared_for(p) for p in paths}
        if len(declared) == 1 and None not in declared:
            classes = list(declared.pop())
    if classes is None or fine_classes is None:
        sites = [load_site(p, labels_required=labels_required) for p in paths]
        if classes is None:
            if labels_required:
                _refuse_rare_labels(sites)
            classes = list(class_order(c for s in sites for c in s.classes))
        if fine_classes is None:
            fines = [f for s in sites for f in s.fine_classes or ()]
            fine_classes = list(class_order(fines)) if fines else None
    out: list[SiteBags] = []
    for path in paths:
        site = load_site(
            path, classes=classes, fine_classes=fine_classes, labels_required=labels_required
        )
        ids = [p.patient_id for p in site.patients]
        fdir = feature_dir_for(path, ids, data_cfg, device, progress)
        bags = load_bags(site, feature_dir=fdir, expected_dim=expected_dim)
        dim = int(bags[0].features.shape[1])
        if expected_dim is None:
            expected_dim = dim
        out.append(SiteBags(site, bags, fdir))
    return out



def _refuse_rare_labels(sites: Sequence[SiteData]) -> None:
    problems = rare_label_problems([(s.path / PATIENTS_CSV, s.patients) for s in sites])
    if problems:
        raise SiteDataError("\n".join(problems))


def split_train_val_test(
    sb: SiteBags, cfg: TrainConfig, seed_offset: int = 0
) -> tuple[list[Bag], list[Bag], list[Bag]]:
    """Use the site's split column when present; otherwise carve a stratified validation set.

    A site with a split column but no ``val`` rows gets a validation set carved from its
    ``train`` rows. ``test`` rows are returned separately and never used for selection.
    """
    if sb.site.has_splits:
        train, val, test = sb.by_split("train"), sb.by_split("val"), sb.by_split("test")
        if val:
            return train, val, test
        pool = train
    else:
        pool, test = list(sb.bags), []
    labels = [b.label for b in pool]
    tr_idx, va_idx = train_val_split(
        np.arange(len(pool)), np.asarray(labels), cfg.val_fraction, cfg.seed + seed_offset
    )
    return [pool[i] for i in tr_idx], [pool[i] for i in va_idx], test

