"""Masked multi-head self-attention that takes exact or Nystrom attention per bag.

TransMIL's transformer layer (Shao et al., NeurIPS 2021): pre-norm, residual, no
feed-forward block. Exact attention's (T x T) matrix per head is the reference and fits
bags of up to a few thousand tokens; Nystrom attention (:mod:`micromil_core.nn.nystrom`)
is O(T m) for whole-slide bags. ``attention="auto"`` picks per bag, so one set of weights
serves both (there is no Nystrom-only parameter, such as the depth-wise convolution on V
of the Nystromformer code, that small bags would leave untrained).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from micromil_core.nn._deferred import deferred
from micromil_core.nn.functional import masked_softmax
from micromil_core.nn.nystrom import nystrom_attention

ATTENTION_MODES = ("exact", "nystrom", "auto")


class TransLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual: ``t + MHSA(LayerNorm(t))``.

    Written from ``nn.Linear`` layers (not ``nn.MultiheadAttention``) so the key-padding
    mask is applied in parameter-free code and Opacus sees only Linear/LayerNorm layers.
    Each bag takes exact or Nystrom attention by its own token count, in parameter-free
    code between the one ``qkv`` and the one ``out`` call, so a batch may mix both:
    ``exact`` always; ``nystrom`` above ``landmarks`` tokens; ``auto`` above
    ``max(landmarks, nystrom_threshold)`` tokens. With at most ``landmarks`` tokens a bag
    always takes exact attention (Nystrom would cost more and be no more exact).
    ``dropout`` acts on the exact attention weights and on the output.

    Shapes: t (B, T, L), key_mask (B, T) -> (B, T, L) and the class token's attention (B, H, T)
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        dropout: float = 0.0,
        attention: str = "auto",
        nystrom_threshold: int = 2048,
        landmarks: int = 256,
        pinv_iterations: int = 6,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(
                f"TransLayer: dim={dim} is not divisible by n_heads={n_heads}; "
                "choose dim as a multiple of n_heads"
            )
        if attention not in ATTENTION_MODES:
            raise ValueError(
                f"TransLayer: attention={attention!r} is not one of {', '.join(ATTENTION_MODES)}"
            )
        self.dim, self.n_heads, self.dropout = dim, n_heads, dropout
        self.attention, self.nystrom_threshold = attention, nystrom_threshold
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations
        self.norm = deferred(nn.LayerNorm, dim)
        self.qkv = deferred(nn.Linear, dim, 3 * dim, bias=False)
        self.out = deferred(nn.Linear, dim, dim)
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's default init of each sublayer, in the order they are built."""
        for layer in (self.norm, self.qkv, self.out):
            layer.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, n_heads={self.n_heads}, dropout={self.dropout}, "
            f"attention={self.attention!r}, nystrom_threshold={self.nystrom_threshold}, "
            f"landmarks={self.landmarks}, pinv_iterations={self.pinv_iterations}"
        )

    def uses_nystrom(self, n_tokens: Tensor) -> Tensor:
        """Which bags take Nystrom attention.

        Shapes: n_tokens (B,) real tokens per bag -> (B,) bool
        """
        if self.attention == "exact":
            return torch.zeros_like(n_tokens, dtype=torch.bool)
        limit = (
            self.landmarks
            if self.attention == "nystrom"
            else max(self.landmarks, self.nystrom_threshold)
        )
        return n_tokens > limit

    def _exact(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Shapes: q, k, v (B, H, T, d), key_mask (B, T) -> (B, H, T, d), row 0 (B, H, T)"""
        attn = masked_softmax(q @ k.transpose(-1, -2), key_mask[:, None, None, :])  # (B, H, T, T)
        return self.drop(attn) @ v, attn[:, :, 0]

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, nystrom: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Exact attention for the bags where ``nystrom`` is False, Nystrom for the rest.

        Each group is cut to its own longest bag, so the exact group's (T x T) matrices are
        only as large as its bags (at most ``nystrom_threshold`` tokens under ``auto``).

        Shapes: q, k, v (B, H, T, d), key_mask (B, T), nystrom (B,) -> (B, H, T, d), (B, H, T)
        """
        m, iterations = self.landmarks, self.pinv_iterations
        if not bool(nystrom.any()):
            return self._exact(q, k, v, key_mask)
        if bool(nystrom.all()):
            return nystrom_attention(q, k, v, key_mask, m, iterations)
        n_tok = key_mask.shape[1]
        mixed, rows, order = [], [], []
        for use in (False, True):
            idx = (nystrom == use).nonzero()[:, 0]  # (G,)
            span = int(key_mask[idx].any(dim=0).nonzero().max()) + 1  # past its last real token
            args = (q[idx, :, :span], k[idx, :, :span], v[idx, :, :span], key_mask[idx, :span])
            if use:
                out, row = nystrom_attention(*args, m, iterations)
            else:
                out, row = self._exact(*args)
            # Tokens past `span` are padding in this group: zero output, zero attention.
            mixed.append(nn.functional.pad(out, (0, 0, 0, n_tok - span)))  # (G, H, T, d)
            rows.append(nn.functional.pad(row, (0, n_tok - span)))  # (G, H, T)
            order.append(idx)
        back = torch.argsort(torch.cat(order))  # (B,): batch position -> row of the concat
        return torch.cat(mixed)[back], torch.cat(rows)[back]

    def forward(self, t: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        b, n_tok, dim = t.shape
        heads = self.n_heads
        head_dim = dim // heads
        qkv = self.qkv(self.norm(t)).view(b, n_tok, 3, heads, head_dim)  # (B, T, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, d) each
        nystrom = self.uses_nystrom(key_mask.sum(dim=1))  # (B,)
        mixed, row0 = self._attend(q * head_dim**-0.5, k, v, key_mask, nystrom)  # (B, H, T, d)
        mixed = mixed.to(v.dtype).transpose(1, 2).reshape(b, n_tok, dim)  # (B, T, L)
        return t + self.drop(self.out(mixed)), row0  # (B, T, L), (B, H, T)
