"""MicroMIL's representative draw: which instance each cluster sends to the graph.

``select_representatives`` (the released rule: each cluster draws independently, repeats
allowed) and ``select_distinct`` (one-to-one: no instance twice), both a hard
Gumbel-Softmax with straight-through weights in training and an argmax at eval, and the
per-instance ``selection_scores`` that the explanations show.
"""

from __future__ import annotations

import torch
from torch import Tensor

from micromil_core.nn import masked_softmax


def gumbel_noise(like: Tensor) -> Tensor:
    """Standard Gumbel(0, 1) samples shaped like ``like``: -log E, E ~ Exp(1).

    torch's CPU exponential sampler is ~6x slower than ``rand`` (7 of a 10,000-instance
    step's ~180 ms), but -log(-log U) from uniform draws, the same distribution, is another
    random stream: every seed's training changes, and on 10-fold CV x 3 seeds it moved the
    test AUC by -0.040 (UCSB), -0.009 (MUSK1) and -0.003 (MUSK2), within the folds' noise
    yet all one way (docs/benchmarks.md). Kept, so a seed trains as it did.
    """
    return -torch.empty_like(like).exponential_().log()


def select_representatives(
    s: Tensor, mask: Tensor, tau: float, training: bool
) -> tuple[Tensor, Tensor | None]:
    """Pick one instance per cluster: hard Gumbel-Softmax over N in training, argmax at eval.

    Returns the chosen indices and, in training, the straight-through one-hot weights
    (forward value one-hot, gradient of the soft sample); ``None`` at eval.

    Shapes: s (B, N, K), mask (B, N) -> index (B, K), weights (B, N, K) or None
    """
    valid = mask.unsqueeze(-1)  # (B, N, 1)
    if not training:
        return s.masked_fill(~valid, float("-inf")).argmax(dim=1), None  # (B, K)
    soft = masked_softmax((s + gumbel_noise(s)) / tau, valid, dim=1)  # (B, N, K)
    index = soft.argmax(dim=1)  # (B, K)
    hard = torch.zeros_like(soft).scatter_(1, index.unsqueeze(1), 1.0)  # (B, N, K)
    return index, hard - soft.detach() + soft


def select_distinct(
    s: Tensor, mask: Tensor, tau: float, training: bool
) -> tuple[Tensor, Tensor | None]:
    """One representative per cluster, never the same instance twice.

    A greedy one-to-one draw on the (Gumbel-perturbed in training) scores: the best
    remaining (instance, cluster) pair is taken, its instance and cluster leave the pool,
    min(N, K) times. Clusters left over when N < K get no node (index -1). In training the
    straight-through weights of cluster k are a softmax over the instances still free when
    k drew, so the gradient reaches the scores as in ``select_representatives``.
    Cost: one top-min(N, K) pass over the (N, K) scores (``draw_distinct``).

    Shapes: s (B, N, K), mask (B, N) -> index (B, K) (-1 = no node), weights (B, N, K) or None
    """
    logits = s + gumbel_noise(s) if training else s  # (B, N, K)
    with torch.no_grad():
        index, pool = draw_distinct(logits.detach().masked_fill(~mask.unsqueeze(-1), float("-inf")))
    if not training:
        return index, None
    soft = masked_softmax(logits / tau, pool, dim=1)  # (B, N, K), 0 for clusters without a node
    hard = torch.zeros_like(soft)
    has = index >= 0  # (B, K)
    hard.scatter_(1, index.clamp_min(0).unsqueeze(1), has.unsqueeze(1).to(soft.dtype))
    return index, hard - soft.detach() + soft


def selection_scores(s: Tensor, mask: Tensor) -> Tensor:
    """Per instance, its largest selection probability over the clusters.

    The representative extractor draws one instance per cluster from a softmax of ``s``
    over the bag's instances; an instance likely to be drawn by any cluster scores high.
    No gradient: the scores rank and explain instances, they are not trained.

    Shapes: s (B, N, K), mask (B, N) -> (B, N), 0 at padding
    """
    with torch.no_grad():
        return masked_softmax(s, mask.unsqueeze(-1), dim=1).amax(dim=-1)


def draw_distinct(free: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy one-to-one (instance, cluster) draw, best pair first, min(N, K) times.

    Only each cluster's best min(N, K) instances can ever be its pick (fewer than that are
    taken before it draws), so the greedy walks those candidates in order of score (ties:
    lower instance, then lower cluster, as a max over the flat (N, K) scores would).
    Where a candidate list ends in a tie that the cut could break differently, the bag is
    drawn over all N x K pairs instead.

    Shapes: free (B, N, K) scores, -inf at padding -> index (B, K) (-1 = no node),
        pool (B, N, K) bool: the instances still free when each cluster drew
    """
    b, n, k = free.shape
    c = min(n, k)
    vals, inst = free.topk(c, dim=1)  # (B, c, K)
    cut_tie = (free >= vals[:, -1:, :]).sum(1) > c  # (B, K): more than c reach the cut
    cut_tie = (cut_tie & (vals[:, -1, :] > float("-inf"))).any(1).tolist()  # (B,)
    vals, inst = vals.cpu(), inst.cpu()
    index = torch.full((b, k), -1, dtype=torch.long)
    taken_at = torch.full((b, n), k, dtype=torch.long)  # step each instance was taken
    drew_at = torch.full((b, k), k, dtype=torch.long)  # step each cluster drew; k = never
    clus = torch.arange(k).expand(c, k)
    for row in range(b):
        if cut_tie[row]:  # all N x K pairs, in flat order before the stable sort
            flat_scores = free[row].cpu().flatten()
            order = torch.sort(-flat_scores, stable=True).indices
            v, i, cl = flat_scores[order], order // k, order % k
        else:
            flat = (inst[row] * k + clus).flatten()  # positions in the flat (N, K) scores
            first = torch.argsort(flat)
            order = first[torch.sort(-vals[row].flatten()[first], stable=True).indices]
            v, i, cl = vals[row].flatten()[order], inst[row].flatten()[order], clus.flatten()[order]
        _walk(v.tolist(), i.tolist(), cl.tolist(), c, row, index, taken_at, drew_at)
    pool = (taken_at.unsqueeze(-1) >= drew_at.unsqueeze(1)) & (drew_at < k).unsqueeze(1)
    dev = free.device
    return index.to(dev), pool.to(dev) & (free > float("-inf"))


def _walk(values: list, insts: list, clusters: list, picks: int, row: int, index: Tensor,
          taken_at: Tensor, drew_at: Tensor) -> None:
    """Take candidates in order while both their instance and cluster are free."""
    used_i: set[int] = set()
    used_c: set[int] = set()
    step = 0
    for v, i, c in zip(values, insts, clusters, strict=True):
        if v == float("-inf") or step == picks:
            break
        if i in used_i or c in used_c:
            continue
        used_i.add(i)
        used_c.add(c)
        index[row, c] = i
        taken_at[row, i] = step
        drew_at[row, c] = step
        step += 1
