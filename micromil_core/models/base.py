"""The one contract every MIL model in micromil-fl follows.

``forward(x, mask) -> logits``, ``loss(x, mask, target) -> (loss, parts)`` and
``predict(x, mask) -> Prediction``. Inputs are dense padded bags (see
``micromil_core.data.bag``). Modules that own parameters take a single tensor, and
masking/sampling happens in parameter-free code, so Opacus can compute per-bag gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Prediction:
    """What ``predict`` returns for a batch of B bags.

    Shapes:
        probs: (B, C) class probabilities
        instance_scores: (B, N) attention / importance per instance (0 where padded), or None
        selected: (B, K) indices of representative instances (MicroMIL), or None
        adjacency: (B, K, K) graph between the selected instances (MicroMIL), or None
    """

    probs: Tensor
    instance_scores: Tensor | None = None
    selected: Tensor | None = None
    adjacency: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class: subclasses implement ``forward`` and may extend ``loss``/``predict``.

    Attributes set by subclasses:
        in_dim: instance feature dimension D
        n_classes: number of bag classes C
    """

    in_dim: int
    n_classes: int

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B, N, D), (B, N) -> (B, C)
        raise NotImplementedError

    def loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on bag labels; subclasses add auxiliary terms to ``parts``."""
        logits = self(x, mask)
        ce = F.cross_entropy(logits, target, weight=class_weight)
        return ce, {"ce": float(ce.detach())}

    @torch.no_grad()
    def init_from_data(
        self, x: Tensor, mask: Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Data-dependent initialisation before training (e.g. MicroMIL's centroids).

        Called once by the trainer with a sample of TRAINING bags; a no-op by default.
        """

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        """Deterministic class probabilities (call under ``model.eval()``)."""
        return Prediction(probs=torch.softmax(self(x, mask), dim=-1))


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` is False.

    Shapes: scores (..., N), mask broadcastable to scores -> (..., N)
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask
