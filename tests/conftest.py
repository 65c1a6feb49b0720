"""Shared fixtures: tiny synthetic site folders for plumbing tests (never accuracy claims)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch


def write_site(
    root: Path,
    n_patients: int = 12,
    dim: int = 6,
    labels: tuple[str, ...] = ("benign", "malignant"),
    splits: bool = False,
    seed: int = 0,
    instances: tuple[int, int] = (3, 9),
) -> Path:
    """A site whose positive bags hold a shifted 'key instance' (learnable, tiny)."""
    gen = torch.Generator().manual_seed(seed)
    (root / "features").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_patients):
        label = labels[i % len(labels)]
        n = int(torch.randint(instances[0], instances[1] + 1, (1,), generator=gen))
        feats = torch.randn(n, dim, generator=gen)
        if label == labels[-1]:
            feats[0] += 3.0
        pid = f"p{i:03d}"
        torch.save(feats, root / "features" / f"{pid}.pt")
        row = {"patient_id": pid, "label": label}
        if splits:
            row["split"] = ("train", "train", "val", "test")[i % 4] if i >= 4 else ("train" if i < 2 else "val")
        rows.append(row)
    with open(root / "patients.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def patient_ids(root: Path) -> set[str]:
    """Every patient id of the site folders under ``root`` (for leak checks)."""
    ids = set()
    for csv_path in root.glob("site-*/patients.csv"):
        with open(csv_path) as fh:
            ids |= {row["patient_id"] for row in csv.DictReader(fh)}
    return ids


@pytest.fixture
def tiny_site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site-a")
