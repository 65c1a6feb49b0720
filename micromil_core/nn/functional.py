"""Parameter-free tensor functions the layers of :mod:`micromil_core.nn` and the models share."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` is False.

    Shapes: scores (..., N), mask broadcastable to scores -> (..., N)
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask
