"""Attention-based MIL (Ilse, Tomczak & Welling, ICML 2018): ``abmil`` and ``gated-abmil``.

An instance MLP embeds each instance, an attention network scores it, a masked softmax
over the bag's real instances turns scores into weights, and a linear classifier reads the
weighted sum. ``gated-abmil`` multiplies the tanh branch by a sigmoid gate (Ilse et al.,
eq. 9). Every parameter-owning submodule takes a single tensor, so Opacus can compute
per-bag gradients on padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.pooling import check_batch, mlp
from micromil_core.models.registry import check_float, check_int, register_model
from micromil_core.nn import masked_softmax


@dataclass(frozen=True)
class ABMILParams:
    """Hyper-parameters of ``abmil`` and ``gated-abmil``.

    The default embedding 256 -> 128 with attention dim 128 mirrors Ilse et al.'s MUSK
    network (fc-256, fc-128, attention 128) and suits 166-d MUSK as well as 512/1024-d
    image features.
    Dropout is not in Ilse et al.; 0.25 is a light regulariser for small cohorts.
    """

    embed_dims: tuple[int, ...] = (256, 128)  # instance MLP widths; () = raw features
    attn_dim: int = 128
    dropout: float = 0.25

    def __post_init__(self) -> None:
        for d in self.embed_dims:
            check_int("abmil", "embed_dims", d, 1)
        check_int("abmil", "attn_dim", self.attn_dim, 1)
        check_float("abmil", "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)


@register_model(
    "abmil", ABMILParams, "attention MIL (Ilse et al. 2018): tanh attention over instances"
)
class ABMIL(MILModel):
    """Attention MIL; ``predict`` returns the attention weights as instance scores.

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C); attention (B, N), 0 at padding.
    """

    gated = False

    def __init__(self, in_dim: int, n_classes: int, params: ABMILParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        self.embed = mlp(in_dim, params.embed_dims, params.dropout)
        width = params.embed_dims[-1] if params.embed_dims else in_dim
        self.attn_v = nn.Linear(width, params.attn_dim)
        self.attn_u = nn.Linear(width, params.attn_dim) if self.gated else None
        self.attn_w = nn.Linear(params.attn_dim, 1)
        self.head = nn.Linear(width, n_classes)

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Logits, the attention-pooled bag embedding z and the attention weights.

        Shapes: x (B, N, D), mask (B, N) -> logits (B, C), bag (B, L), scores (B, N)
        """
        check_batch(x, mask, self.in_dim)
        h = self.embed(x)  # (B, N, L)
        g = torch.tanh(self.attn_v(h))  # (B, N, A)
        if self.attn_u is not None:
            g = g * torch.sigmoid(self.attn_u(h))  # (B, N, A)
        a = masked_softmax(self.attn_w(g).squeeze(-1), mask)  # (B, N)
        z = torch.einsum("bn,bnl->bl", a, h)  # (B, L)
        return Encoding(logits=self.head(z), bag=z, scores=a)  # (B, C), (B, L), (B, N)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Shapes: x (B, N, D), mask (B, N) -> (B, C)"""
        return self.encode(x, mask).logits

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        return self.encode(x, mask).prediction()


@register_model(
    "gated-abmil", ABMILParams, "gated attention MIL (Ilse et al. 2018): tanh * sigmoid attention"
)
class GatedABMIL(ABMIL):
    """Gated attention MIL: attention hidden = tanh(V h) * sigmoid(U h).

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C); attention (B, N), 0 at padding.
    """

    gated = True
