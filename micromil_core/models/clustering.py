"""K-means for seeding cluster centroids (MicroMIL's ``centroid_init: kmeans`` and ``spread``)."""

from __future__ import annotations

import torch
from torch import Tensor


def kmeans(
    h: Tensor, k: int, generator: torch.Generator | None = None, iters: int = 25
) -> Tensor:
    """K centres of the rows of ``h``: k-means++ seeding, then Lloyd iterations.

    Seeded by ``generator`` (CPU), so a run is reproducible. A centre left without points
    keeps its place. With fewer rows than K, rows repeat (as ``init_centroids_``).

    Shapes: h (M, P) -> (K, P)
    """
    m = h.shape[0]
    if m <= k:
        return h[torch.arange(k, device=h.device) % m].clone()

    def draw(weights: Tensor) -> int:
        return int(torch.multinomial(weights.cpu(), 1, generator=generator))

    centres = [h[draw(torch.ones(m))]]
    d2 = ((h - centres[0]) ** 2).sum(-1)  # (M,) squared distance to the nearest centre
    for _ in range(1, k):
        nxt = h[draw(d2.clamp_min(0) + 1e-12)]
        centres.append(nxt)
        d2 = torch.minimum(d2, ((h - nxt) ** 2).sum(-1))
    mu = torch.stack(centres)  # (K, P)
    for _ in range(iters):
        owner = torch.cdist(h, mu).argmin(-1)  # (M,)
        total = torch.zeros_like(mu).index_add_(0, owner, h)  # (K, P)
        count = torch.bincount(owner, minlength=k).unsqueeze(-1).to(h.dtype)  # (K, 1)
        new = torch.where(count > 0, total / count.clamp_min(1), mu)
        if torch.allclose(new, mu):
            break
        mu = new
    return mu
