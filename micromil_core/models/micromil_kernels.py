"""MicroMIL's training step with less memory traffic: same maths as the plain modules.

A MicroMIL step is dominated by the (N, D) -> (N, P) projection: its forward and weight
gradient are the step's compute floor (``benchmarks/speed_memory.py``). With autograd and
plain modules, everything else that touches the (N, P) activations (the leaky ReLU, the
squared norms and centroid products of the Student-t kernel, the relevance score, the
straight-through gather of the representatives, and summing their gradients) reads and
writes N x P floats many more times, and doubled the step. Here:

- ``project_and_score`` runs the projection in row chunks that stay in cache: the leaky
  ReLU, ``H mu^T``, ``H w`` and ``|h|^2`` of a chunk are computed while it is hot, and the
  backward pass builds each chunk's gradient with one matmul (``[dC | da] [mu; w]``) plus
  the norm term, applies the leaky ReLU's slope and accumulates the weight gradient, again
  chunk by chunk. No (N, P) gradient is ever materialised.
- ``representative_rows`` gathers the K picked rows exactly (the forward value of the
  straight-through product ``weights^T H``, whose weights are one-hot) and gives the
  straight-through gradient ``H dR^T`` to the weights; H's own gradient is K rows, which
  it hands to ``project_and_score``'s backward instead of a dense (N, P) tensor.
- ``micromil_selection.draw_distinct`` runs the one-to-one draw on each cluster's top
  min(N, K) instances instead of min(N, K) passes over all N x K scores.

The plain module path stays for anything that hooks the modules (Opacus's per-sample
gradients) and for inference; tests check that both give the same values and gradients.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk: 1024 rows x P=1024 floats = 4 MiB, which stays in a core's cache
# hierarchy between the chunk's operations (measured fastest of 512-8192 on this CPU).
CHUNK_ROWS = 1024
LEAKY_SLOPE = 0.01  # F.leaky_relu's default, as MicroMIL.project uses


class _Workspace:
    """One spare (rows, P) buffer for H per device and dtype, reused from step to step.

    A fresh H of 10,000 x 1,024 floats is 40 MB that the C library maps anew each step, and
    its first write page-faults (~8 ms at 10k rows, a twentieth of the step). H is taken
    here by the forward pass and given back at the end of the backward pass, when nothing
    can read it any more; a pass whose backward never runs simply keeps its own buffer.
    Writing into a buffer some retained graph still holds would be caught by autograd's
    version check on the saved H, not read silently: a graph kept with ``retain_graph``
    cannot be run backward again once the next step has run its forward.
    """

    def __init__(self) -> None:
        self._spare: dict[tuple, Tensor] = {}
        self._lock = threading.Lock()

    def take(self, rows: int, cols: int, like: Tensor) -> Tensor:
        key = (like.device, like.dtype, cols)
        with self._lock:
            spare = self._spare.pop(key, None)
        if spare is None or spare.shape[0] < rows:
            return like.new_empty(rows, cols)
        return spare[:rows]

    def give_back(self, h: Tensor) -> None:
        base = h if h._base is None else h._base
        key = (base.device, base.dtype, base.shape[1])
        with self._lock:
            kept = self._spare.get(key)
            if kept is None or kept.shape[0] < base.shape[0]:
                self._spare[key] = base

    def clear(self) -> None:
        """Drop the spare buffers: ``MicroMIL.finish_training`` does, at the end of every
        ``fit``, so an idle site process does not hold its largest H."""
        with self._lock:
            self._spare.clear()


WORKSPACE = _Workspace()


@dataclass
class RowGradients:
    """Where ``representative_rows``'s backward leaves the gradient of the picked rows of H
    for ``project_and_score``'s backward: ``rows`` (M,) flat row numbers of H, ``grads``
    (M, P). Autograd runs that backward first: the picked rows feed the selection scores."""

    rows: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


class _ProjectAndScore(torch.autograd.Function):
    """H = leaky(x W^T + b), C = H M^T, hsq = |H|^2 per row, over (R, D) rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, m, picked: RowGradients, chunk: int):  # noqa: D401
        rows, p = x.shape[0], weight.shape[0]
        h = WORKSPACE.take(rows, p, x)
        c = x.new_empty(rows, m.shape[0])
        hsq = x.new_empty(rows)
        wt, mt = weight.t(), m.t()
        for s in range(0, rows, chunk):
            hc = h[s : s + chunk]
            # mm, then the bias in place: addmm(out=) first writes a broadcast copy of it.
            torch.mm(x[s : s + chunk], wt, out=hc).add_(bias)
            F.leaky_relu_(hc, LEAKY_SLOPE)
            torch.mm(hc, mt, out=c[s : s + chunk])
            # One reduction pass; vecdot would write the (rows, P) product first.
            torch.linalg.vector_norm(hc, dim=1, out=hsq[s : s + chunk]).square_()
        ctx.save_for_backward(x, weight, m, h)
        ctx.picked, ctx.chunk = picked, chunk
        ctx.mark_non_differentiable(h)  # H's gradient arrives through ``picked``
        ctx.set_materialize_grads(False)  # no (N, P) zeros for H's absent gradient
        return h, c, hsq

    @staticmethod
    def backward(ctx, _dh, dc, dhsq):
        x, weight, m, h = ctx.saved_tensors
        rows, chunk = x.shape[0], ctx.chunk
        dc = torch.zeros_like(h[:, : m.shape[0]]) if dc is None else dc.contiguous()
        dhsq = torch.zeros_like(h[:, 0]) if dhsq is None else dhsq
        picked = ctx.picked
        extra_rows = torch.cat(picked.rows) if picked.rows else None
        extra_grads = torch.cat(picked.grads) if picked.grads else None
        picked.rows, picked.grads = [], []  # taken: a retained graph's next backward refills
        need_w, need_b, need_m = ctx.needs_input_grad[1:4]
        # The first chunk writes dW, db and dM (beta=0): no zero-filled start to read back.
        dw = weight.new_empty(weight.shape) if need_w else None
        db = weight.new_empty(weight.shape[0]) if need_b else None
        dm = m.new_empty(m.shape) if need_m else None
        g = h.new_empty(min(chunk, rows), h.shape[1])
        ones = h.new_ones(min(chunk, rows))
        for s in range(0, rows, chunk):
            e = min(rows, s + chunk)
            hc, gc = h[s:e], g[: e - s]
            torch.mm(dc[s:e], m, out=gc)  # the kernel's and the score's gradient, at once
            if extra_rows is not None:  # the representatives' straight-through gradient
                inside = (extra_rows >= s) & (extra_rows < e)
                if inside.any():
                    gc.index_add_(0, extra_rows[inside] - s, extra_grads[inside])
            gc.addcmul_(hc, dhsq[s:e].unsqueeze(1), value=2.0)
            # The slope in place: a fresh chunk per call would cost page faults.
            gz = torch.ops.aten.leaky_relu_backward.grad_input(gc, hc, LEAKY_SLOPE, True, grad_input=gc)
            beta = 0.0 if s == 0 else 1.0
            if dw is not None:
                dw.addmm_(gz.t(), x[s:e], beta=beta)
            if db is not None:  # a matrix-vector product: sum(0) reduces across rows slowly
                db.addmv_(gz.t(), ones[: e - s], beta=beta)
            if dm is not None:  # the centroids' and the score's gradient, H still hot
                dm.addmm_(dc[s:e].t(), hc, beta=beta)
        WORKSPACE.give_back(h)  # nothing reads H after this pass (see _Workspace)
        return None, dw, db, dm, None, None


def project_and_score(
    x: Tensor, weight: Tensor, bias: Tensor, centroids: Tensor, score_w: Tensor,
    picked: RowGradients, chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The projection and everything computed from it row by row.

    Returns H = leaky_relu(x W^T + b), H mu^T, the relevance H w, and |h|^2, equal (up to
    rounding) to the plain modules' values and gradients. H itself carries no autograd
    history: its only other use, the representatives, must go through
    ``representative_rows`` with the same ``picked``.

    Shapes: x (B, N, D), weight (P, D), bias (P,), centroids (K, P), score_w (1, P)
        -> h (B, N, P), cross (B, N, K), a (B, N, 1), hsq (B, N, 1)
    """
    b, n, _ = x.shape
    k = centroids.shape[0]
    m = torch.cat([centroids, score_w], dim=0)  # (K + 1, P)
    chunk = chunk or CHUNK_ROWS
    h, c, hsq = _ProjectAndScore.apply(x.reshape(b * n, -1), weight, bias, m, picked, chunk)
    c = c.view(b, n, k + 1)
    return h.view(b, n, -1), c[..., :k], c[..., k:], hsq.view(b, n, 1)


class _RepresentativeRows(torch.autograd.Function):
    """r[b, k] = h[b, index[b, k]] (0 where index is -1); straight-through weights."""

    @staticmethod
    def forward(ctx, weights, h, index, picked: RowGradients):
        real = index >= 0  # (B, K)
        gather = index.clamp_min(0).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        r = h.gather(1, gather) * real.unsqueeze(-1)  # (B, K, P)
        ctx.save_for_backward(h, index)
        ctx.picked = picked
        return r

    @staticmethod
    def backward(ctx, dr):
        h, index = ctx.saved_tensors
        b, n, _ = h.shape
        # (B, N, K): the gradient of weights^T H. One 2-D product when B = 1 (the usual
        # one-bag step): bmm's path was slower for this (N, P) x (P, K) shape.
        if b == 1:
            d_weights = torch.mm(h[0], dr[0].t()).unsqueeze(0)
        else:
            d_weights = h @ dr.transpose(1, 2)
        real = index >= 0
        flat = (index + torch.arange(b, device=h.device).unsqueeze(1) * n)[real]  # (M,)
        ctx.picked.rows.append(flat)
        ctx.picked.grads.append(dr[real])  # weights are one-hot: row index[k] gets dR[k]
        return d_weights, None, None, None


def representative_rows(weights: Tensor, h: Tensor, index: Tensor, picked: RowGradients) -> Tensor:
    """The picked rows of H with the straight-through gradient of ``weights^T @ h``.

    Shapes: weights (B, N, K) one-hot in value, h (B, N, P), index (B, K) -> (B, K, P)
    """
    return _RepresentativeRows.apply(weights, h, index, picked)
