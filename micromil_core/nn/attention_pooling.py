"""Layers that score a bag's instances for attention pooling, and read class embeddings.

The masked softmax over the scores and the weighted sum stay in the models: they are
parameter-free, so Opacus only ever sees these one-input layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from micromil_core.nn._deferred import deferred


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018, eq. 9), ``n_out`` per instance.

    ``w(tanh(v h) * sigmoid(u h))``: one score per instance and output, e.g. per class
    (HMIL's class-wise attention). Unnormalised: the caller masks padding and takes the
    softmax over the bag.

    Shapes: h (B, N, L) -> scores (B, N, n_out)
    """

    def __init__(self, in_dim: int, attn_dim: int, n_out: int = 1) -> None:
        super().__init__()
        self.in_dim, self.attn_dim, self.n_out = in_dim, attn_dim, n_out
        self.v = deferred(nn.Linear, in_dim, attn_dim)
        self.u = deferred(nn.Linear, in_dim, attn_dim)
        self.w = deferred(nn.Linear, attn_dim, n_out)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's default Linear init of v, u and w, in that order."""
        for lin in (self.v, self.u, self.w):
            lin.reset_parameters()

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, attn_dim={self.attn_dim}, n_out={self.n_out}"

    def forward(self, h: Tensor) -> Tensor:
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))  # (B, N, n_out)


class ClassWiseLinear(nn.Module):
    """One linear scorer per class, each reading its own class embedding.

    Shapes: z (B, K, L) -> (B, K)
    """

    def __init__(self, n_classes: int, width: int) -> None:
        super().__init__()
        self.n_classes, self.width = n_classes, width
        self.weight = nn.Parameter(torch.empty(n_classes, width))
        self.bias = nn.Parameter(torch.empty(n_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights uniform in nn.Linear's range for ``width`` inputs, zero bias."""
        nn.init.uniform_(self.weight, -(self.width**-0.5), self.width**-0.5)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, width={self.width}"

    def forward(self, z: Tensor) -> Tensor:
        return (z * self.weight).sum(-1) + self.bias  # (B, K)
