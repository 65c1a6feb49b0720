"""Bags in memory and the dense padded batch every model consumes.

Models see dense padded batches ``x (B, N, D)`` with a boolean ``mask (B, N)`` instead of
ragged lists: the same tensors serve plain training, batched evaluation and Opacus per-bag
(per-patient) gradients, where one padded row is one privacy unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# The label of a patient scored without a diagnosis (``micromil predict``).
UNLABELLED = -1


@dataclass
class Slides:
    """Which slide (or capture) of its patient each instance of a bag came from.

    Site-only: a ``BagBatch`` does not carry it, so it never reaches a model update or a
    federated message; the explanation and its heatmaps read it.

    Shapes:
        index: (N,) int64, slide of each instance, in [0, len(names))
        coords: (N, 2) float32 (x, y) on its slide; NaN rows for the instances of slides
            without coordinates; None when no slide has coordinates
    """

    names: list[str]
    index: Tensor
    coords: Tensor | None = None

    def rows(self, slide: int) -> Tensor:
        """Positions in the bag of one slide's instances, in bag order. Shapes: (N_s,)"""
        return torch.nonzero(self.index == slide).flatten()

    def has_coords(self, slide: int) -> bool:
        """Whether every instance of ``slide`` has a position on it."""
        if self.coords is None:
            return False
        rows = self.rows(slide)
        return len(rows) > 0 and bool(torch.isfinite(self.coords[rows]).all())


@dataclass
class Bag:
    """One patient: N instance feature vectors and the patient label.

    Shapes:
        features: (N, D) float32
        scales: (N,) int64 or None -- index of the magnification/crop scale of each
            instance (MRAN); None when the site has a single scale.
        slides: which slide/capture each instance came from, with positions where known
            (:class:`Slides`); None for bags not read from a site folder.
    """

    patient_id: str
    features: Tensor
    label: int
    fine_label: int | None = None
    scales: Tensor | None = None
    instance_names: list[str] = field(default_factory=list)
    slides: Slides | None = None

    @property
    def num_instances(self) -> int:
        return int(self.features.shape[0])


@dataclass
class BagBatch:
    """A padded batch of bags.

    Shapes:
        x: (B, N_max, D) float32, zeros where padded
        mask: (B, N_max) bool, True for real instances
        y: (B,) int64 bag labels
        y_fine: (B,) int64 fine labels, -1 where unknown
        scales: (B, N_max) int64, 0 where padded
    """

    x: Tensor
    mask: Tensor
    y: Tensor
    y_fine: Tensor
    scales: Tensor
    patient_ids: list[str]

    def to(self, device: torch.device | str) -> BagBatch:
        return BagBatch(
            self.x.to(device),
            self.mask.to(device),
            self.y.to(device),
            self.y_fine.to(device),
            self.scales.to(device),
            self.patient_ids,
        )

    def __len__(self) -> int:
        return int(self.x.shape[0])


def collate_bags(bags: list[Bag]) -> BagBatch:
    """Pad a list of bags into one ``BagBatch`` (see class docstring for shapes)."""
    if not bags:
        raise ValueError("collate_bags needs at least one bag")
    n_max = max(b.num_instances for b in bags)
    dim = int(bags[0].features.shape[1])
    x = torch.zeros(len(bags), n_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    scales = torch.zeros(len(bags), n_max, dtype=torch.long)
    for i, bag in enumerate(bags):
        n = bag.num_instances
        x[i, :n] = bag.features.to(torch.float32)
        mask[i, :n] = True
        if bag.scales is not None:
            scales[i, :n] = bag.scales
    y = torch.tensor([b.label for b in bags], dtype=torch.long)
    y_fine = torch.tensor(
        [-1 if b.fine_label is None else b.fine_label for b in bags], dtype=torch.long
    )
    return BagBatch(x, mask, y, y_fine, scales, [b.patient_id for b in bags])
