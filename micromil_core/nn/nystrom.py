"""Nystrom approximation of softmax attention (Xiong et al., AAAI 2021, "Nystromformer").

For m landmarks, O(T m) memory instead of exact attention's O(T^2)::

    F = softmax(Q K_l^T)  (T x m)     A = softmax(Q_l K_l^T)  (m x m)
    B = softmax(Q_l K^T)  (m x T, padded keys masked)     out = F pinv(A) (B V)

Q_l, K_l are the means of m contiguous segments of each bag's REAL tokens, and pinv is the
iterative Moore-Penrose pseudo-inverse (Razavi et al. 2014), scaled per bag and head, so
nothing of one bag depends on the rest of its padded batch. Parameter-free functions: the
projections belong to the caller (:class:`micromil_core.nn.TransLayer`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from micromil_core.nn.functional import masked_softmax


def segment_weights(key_mask: Tensor, m: int, dtype: torch.dtype) -> Tensor:
    """Weights that average ``m`` contiguous segments of each bag's real tokens.

    ``weights @ x`` are Nystromformer's segment-means landmarks. The r-th real token of a
    bag with n of them (in token order, wherever the mask puts them) falls in segment
    ``floor(r m / n)``; with n >= m every segment holds at least floor(n / m) tokens.
    Padded tokens fall in none. A matmul rather than a scatter, so the means are
    deterministic on GPUs too; (m x T) is the size of the attention kernels anyway.

    Shapes: key_mask (B, T) bool with at least m True per row -> (B, m, T)
    """
    n = key_mask.sum(dim=1, keepdim=True)  # (B, 1)
    rank = key_mask.long().cumsum(dim=1) - 1  # (B, T): rank among the bag's real tokens
    segment = torch.where(key_mask, rank * m // n, m)  # (B, T); m = no segment
    arange = torch.arange(m, device=key_mask.device)  # (m,)
    weights = (segment[:, None, :] == arange[None, :, None]).to(dtype)  # (B, m, T)
    return weights / weights.sum(dim=2, keepdim=True).clamp_min(1.0)  # (B, m, T): row means


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of each (m x m) matrix, by iteration (Razavi et al. 2014).

    ``z <- z (13 I - a z (15 I - a z (7 I - a z))) / 4`` converges to pinv(a) from
    ``z = a^T / (max column sum * max row sum)`` of |a| (Nystromformer, Xiong et al. 2021).
    That scale is taken per matrix, not over the batch as in Nystromformer's code, so a
    bag's result never depends on its batch (padding invariance, per-patient DP-SGD).

    Shapes: a (..., m, m) -> (..., m, m)
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (m, m)
    norm = a.abs().sum(dim=-2).amax(dim=-1) * a.abs().sum(dim=-1).amax(dim=-1)  # (...)
    z = a.transpose(-1, -2) / norm[..., None, None]  # (..., m, m)
    for _ in range(iterations):
        az = a @ z  # (..., m, m)
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))  # (..., m, m)
    return z


def nystrom_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, landmarks: int, iterations: int
) -> tuple[Tensor, Tensor]:
    """Nystrom softmax attention ``F pinv(A) (B V)`` and its class-token row ``F[0] pinv(A) B``.

    ``q`` is already scaled by head_dim^-0.5. Landmarks are segment means of each bag's
    real tokens (``segment_weights``), so padded keys enter only B, where they are masked.
    Computed in float32 with autocast off: the pseudo-inverse iteration does not survive
    bf16 rounding. Every bag needs at least ``landmarks`` real tokens, so that no segment
    is empty (TransLayer sends bags of at most ``landmarks`` tokens to exact attention).

    Shapes: q, k, v (B, H, T, d), key_mask (B, T) -> (B, H, T, d), row 0 (B, H, T)
    """
    n_min = int(key_mask.sum(dim=1).min())
    if n_min < landmarks:
        raise ValueError(
            f"Nystrom attention with landmarks={landmarks} got a bag of {n_min} tokens; "
            "use exact attention for bags of at most `landmarks` tokens"
        )
    b, h, n_tok, d = q.shape
    out_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        # Landmarks from the (B, T, H*d) layout: one (m x T) matmul for all heads.
        weights = segment_weights(key_mask, landmarks, q.dtype)  # (B, m, T)
        q_l, k_l = (
            (weights @ x.transpose(1, 2).reshape(b, n_tok, h * d))
            .view(b, landmarks, h, d)
            .transpose(1, 2)
            for x in (q, k)
        )  # (B, H, m, d) each
        f = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, H, T, m)
        a = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, H, m, m)
        bk = masked_softmax(q_l @ k.transpose(-1, -2), key_mask[:, None, None, :])  # (B, H, m, T)
        z = iterative_pinv(a, iterations)  # (B, H, m, m)
        mixed = f @ (z @ (bk @ v))  # (B, H, T, d): (m x T)(T x d) first, never (T x T)
        row0 = ((f[:, :, :1] @ z) @ bk)[:, :, 0]  # (B, H, T)
    return mixed.to(out_dtype), row0
