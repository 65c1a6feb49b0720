"""MHIM-MIL's masking: which instances the student loses, and what of them it gets back.

``hard_instance_mask`` (parameter-free) hides the teacher's top-scored instances, optionally
the lowest-scored ones, then a random share of the rest; the v2 ``RecycleNetwork`` lets
global query tokens summarise the randomly dropped instances for the student. The model
that uses them, and the references, are in ``mhim.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from micromil_core.errors import ConfigError
from micromil_core.nn import masked_softmax

# The registry name of the MHIM model; here because the mask's errors name it.
NAME = "mhim"


# --- masking (parameter-free) ------------------------------------------------------------


def _ranks(values: Tensor) -> Tensor:
    """Rank of each entry along dim 1, 0 = smallest (ties by position).

    Shapes: (B, N) -> (B, N) long
    """
    return values.argsort(dim=1, stable=True).argsort(dim=1)


def _count(ratio: float, total: Tensor, u: Tensor) -> Tensor:
    """Stochastic rounding of ``ratio * total``: its expectation is exact, so a 10% mask
    hides one instance of a 5-instance bag half of the time rather than always or never.

    Shapes: total (B,), u (B,) uniform in [0, 1) -> (B,) long
    """
    return torch.floor(ratio * total.to(u.dtype) + u).long()


def hard_instance_mask(
    scores: Tensor | None,
    mask: Tensor,
    high: float,
    low: float = 0.0,
    random: float = 0.0,
    high_sample: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The student's mask: drop the top-scored, the lowest-scored, then random instances.

    Per bag of n real instances: ``high * n`` instances drawn at random from the top
    ``high / high_sample * n`` by score, then the lowest-scored ``low * n`` of the rest,
    then a random ``random`` share of what is left (counts stochastically rounded). At
    least one real instance is always kept; padding is never kept.

    Returns ``keep`` and ``dropped_random`` (the instances the random mask removed, which
    the recycle network may summarise; the score-masked ones stay hidden).

    Shapes: scores (B, N) or None, mask (B, N) -> keep (B, N), dropped_random (B, N)
    """
    b, n_max = mask.shape
    dev = mask.device
    n = mask.sum(dim=1)  # (B,)
    u = torch.rand(b, 3, device=dev, generator=generator)  # (B, 3)
    no_pick = torch.zeros_like(mask)  # (B, N)
    high_m, low_m = no_pick, no_pick
    if high > 0 or low > 0:
        if scores is None:
            raise ConfigError(
                f"model {NAME!r}: the base model gives no instance scores, so nothing can be "
                "masked by score; set mask_ratio_high: 0 and mask_ratio_low: 0"
            )
        s = scores.detach().float()  # (B, N)
    n_high = torch.zeros_like(n)
    if high > 0:
        n_high = torch.minimum(_count(high, n, u[:, 0]), n - 1)  # (B,)
        pool = torch.ceil(n_high.float() / high_sample - 1e-6).long()  # (B,)
        top = _ranks(-s.masked_fill(~mask, -math.inf)) < torch.minimum(pool, n)[:, None]
        draw = torch.rand(b, n_max, device=dev, generator=generator).masked_fill(~top, 2.0)
        high_m = top & (_ranks(draw) < n_high[:, None])  # (B, N)
    if low > 0:
        n_low = torch.minimum(_count(low, n, u[:, 1]), n - 1 - n_high)  # (B,)
        key = s.masked_fill(~mask | high_m, math.inf)  # (B, N)
        low_m = mask & ~high_m & (_ranks(key) < n_low[:, None])
    rest = mask & ~high_m & ~low_m  # (B, N)
    dropped = no_pick
    if random > 0:
        m = rest.sum(dim=1)  # (B,)
        n_rand = torch.minimum(_count(random, m, u[:, 2]), m - 1)  # (B,)
        draw = torch.rand(b, n_max, device=dev, generator=generator).masked_fill(~rest, 2.0)
        dropped = rest & (_ranks(draw) < n_rand[:, None])  # (B, N)
    return rest & ~dropped, dropped


# --- v2 global recycle network -----------------------------------------------------------


class RecycleNetwork(nn.Module):
    """k global query tokens cross-attend to the randomly dropped instances (MHIM v2).

    The k outputs are appended to the student's kept instances, so what the random mask
    removed still reaches the student in summary. The queries are a buffer shared by all
    bags, moved after each step by EMA toward the batch's mean recycled tokens (authors'
    code: no gradient to the queries). It works in the input feature space because MHIM
    sees its base only through ``encode(x, mask)`` (the paper recycles after the base's
    instance MLP). Masking is parameter-free; each Linear/LayerNorm takes one tensor.

    Shapes: x (B, N, D), dropped (B, N) -> tokens (B, k, D), has_dropped (B,)
    """

    def __init__(self, dim: int, k: int, width: int, heads: int, momentum: float) -> None:
        super().__init__()
        self.heads, self.momentum = heads, momentum
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, width, bias=False)
        self.to_kv = nn.Linear(dim, 2 * width, bias=False)
        self.to_out = nn.Linear(width, dim)
        # Uniform init of prompt tokens from VPT (Jia et al. 2022), as the authors do.
        bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))
        self.register_buffer("queries", torch.empty(k, dim).uniform_(-bound, bound))
        self._pending: Tensor | None = None  # EMA target of the last training batch

    def _heads(self, t: Tensor) -> Tensor:  # (B, M, W) -> (B, h, M, W/h)
        b, m, w = t.shape
        return t.reshape(b, m, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        k, width = self.queries.shape[0], self.to_q.out_features
        q = self._heads(self.to_q(self.norm(self.queries.expand(b, k, -1))))  # (B, h, k, W/h)
        key, val = self.to_kv(self.norm(x)).chunk(2, dim=-1)  # (B, N, W) each
        att = q @ self._heads(key).transpose(-1, -2) * (width // self.heads) ** -0.5
        # A bag with nothing dropped gets all-zero weights; its tokens are masked out later.
        att = masked_softmax(att, dropped[:, None, None, :])  # (B, h, k, N)
        out = (att @ self._heads(val)).transpose(1, 2).reshape(b, k, width)  # (B, k, W)
        tokens = self.to_out(out)  # (B, k, D)
        has = dropped.any(dim=1)  # (B,)
        if self.training and bool(has.any()):
            self._pending = tokens.detach()[has].mean(dim=0)  # (k, D)
        return tokens, has

    @torch.no_grad()
    def update(self) -> None:
        """EMA step of the queries toward the last training batch's recycled tokens.

        Called after the optimiser step: an in-place change during the forward would
        invalidate the autograd graph that still reads the queries.
        """
        if self._pending is not None:
            self.queries.lerp_(self._pending.to(self.queries.dtype), 1.0 - self.momentum)
            self._pending = None


__all__ = ["NAME", "RecycleNetwork", "hard_instance_mask"]
