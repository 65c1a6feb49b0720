"""Feature standardisation fitted on training bags and carried by the checkpoint.

MIL benchmark features (MUSK) span hundreds of units per dimension; z-scoring with
statistics of the TRAINING instances only keeps optimisation stable without leaking
validation or test data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from micromil_core.data.bag import Bag


@dataclass
class FeatureScaler:
    """Shapes: mean (D,), std (D,)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def identity(cls, dim: int) -> FeatureScaler:
        return cls(torch.zeros(dim), torch.ones(dim))

    @classmethod
    def fit(cls, bags: list[Bag]) -> FeatureScaler:
        feats = torch.cat([b.features.double() for b in bags])  # (sum N, D)
        return cls.from_moments(feats.sum(0), (feats**2).sum(0), feats.shape[0])

    @classmethod
    def from_moments(cls, total: Tensor, total_sq: Tensor, count: int) -> FeatureScaler:
        """Build from summed moments (lets several sites combine statistics)."""
        mean = total.double() / count
        var = (total_sq.double() / count - mean**2).clamp_min(0.0)
        std = var.sqrt()
        # Constant dimensions keep scale 1 so they map to 0 instead of dividing by 0.
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        return cls(mean.float(), std.float())

    def transform(self, bag: Bag) -> Bag:
        feats = (bag.features.float() - self.mean) / self.std  # (N, D)
        return replace(bag, features=feats)  # slides and scales stay with the instances

    def transform_all(self, bags: list[Bag]) -> list[Bag]:
        return [self.transform(b) for b in bags]

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> FeatureScaler:
        return cls(state["mean"].float(), state["std"].float())


def scale_bags(bags: list[Bag], scaler: FeatureScaler | None) -> list[Bag]:
    """``bags`` standardised by ``scaler``, or as they are when there is none (features not
    standardised, or standardised elsewhere: ``scaler: site`` fits them at evaluation)."""
    return scaler.transform_all(bags) if scaler is not None else bags
