"""MicroMIL's fast training pass (issue 22) computes what the plain modules compute.

The chunked projection (``micromil_kernels``) and the top-k one-to-one draw
(``micromil_selection.draw_distinct``) are checked against references written the obvious
way: the plain-module pass of the same model (forced by a hook, as Opacus hooks it) and
the greedy draw over all N x K pairs that ``select_distinct`` used before.
"""

from __future__ import annotations

import copy

import pytest
import torch

import micromil_core.models.micromil_kernels as kernels
from micromil_core.models.micromil_selection import draw_distinct
from micromil_core.models.registry import build_model

NEG = float("-inf")


def greedy_over_all_pairs(free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference one-to-one draw: min(N, K) times, the best free (instance, cluster) pair
    of the flat (N, K) scores (first in flat order on ties)."""
    b, n, k = free.shape
    free = free.clone()
    index = torch.full((b, k), -1, dtype=torch.long)
    pool = torch.zeros(b, n, k, dtype=torch.bool)
    for row in range(b):
        for _ in range(min(n, k)):
            best, flat = free[row].flatten().max(0)
            if best == NEG:
                break
            i, c = int(flat) // k, int(flat) % k
            index[row, c] = i
            pool[row, :, c] = free[row, :, c] > NEG
            free[row, i, :] = NEG
            free[row, :, c] = NEG
    return index, pool


@pytest.mark.parametrize("seed", range(40))
def test_draw_distinct_matches_the_greedy_over_all_pairs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b = 1 + seed % 3
    n = int(torch.randint(1, 80, (1,), generator=g))
    k = int(torch.randint(1, 40, (1,), generator=g))
    if seed % 2:  # few distinct values: ties everywhere, also at each cluster's top-k cut
        scores = torch.randint(0, 3, (b, n, k), generator=g).float()
    else:
        scores = torch.randn(b, n, k, generator=g)
    if seed % 4 == 0:  # padded instances
        scores[:, n // 2 :, :] = NEG
    index, pool = draw_distinct(scores)
    ref_index, ref_pool = greedy_over_all_pairs(scores)
    assert torch.equal(index, ref_index)
    assert torch.equal(pool, ref_pool)


def _model_pair(selection: str, dim: int = 24):
    torch.manual_seed(0)
    model = build_model("micromil", dim, 2, {"selection": selection, "n_clusters": 6}).double()
    x = torch.randn(2, 150, dim, dtype=torch.float64)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, 110:] = False  # a shorter bag, padded
    model.init_from_data(x, mask, torch.Generator().manual_seed(1))
    model.train()
    plain = copy.deepcopy(model)
    plain.proj.register_forward_hook(lambda *_: None)  # what Opacus does: plain modules
    return model, plain, x, mask, torch.tensor([1, 0])


@pytest.mark.parametrize("selection", ["distinct", "released", "affinity"])
def test_fast_pass_gives_the_plain_modules_loss_and_gradients(monkeypatch, selection: str) -> None:
    monkeypatch.setattr(kernels, "CHUNK_ROWS", 64)  # several chunks, one of them short
    fast, plain, x, mask, y = _model_pair(selection)
    assert fast._fused(x) and not plain._fused(x)
    losses = []
    for model in (fast, plain):
        torch.manual_seed(7)  # same Gumbel noise for both
        loss, _ = model.loss(x, mask, y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=0)
    for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters(), strict=True):
        assert b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=name)
    assert fast.proj.weight.grad.abs().sum() > 0  # the projection did get a gradient


def test_fast_pass_respects_a_frozen_projection() -> None:
    fast, plain, x, mask, y = _model_pair("distinct")
    for model in (fast, plain):
        model.proj.requires_grad_(False)
        torch.manual_seed(3)
        model.loss(x, mask, y)[0].backward()
    assert fast.proj.weight.grad is None
    torch.testing.assert_close(fast.dce.centroids.grad, plain.dce.centroids.grad)
    torch.testing.assert_close(fast.score.weight.grad, plain.score.weight.grad)


def test_fast_pass_only_where_it_is_safe() -> None:
    fast, _, x, mask, _ = _model_pair("distinct")
    assert fast._fused(x)
    assert not fast._fused(x.clone().requires_grad_(True))  # its backward gives x no gradient
    with torch.no_grad():
        assert not fast._fused(x)
    fast.eval()
    assert not fast._fused(x)
    fast.train()
    handle = fast.dce.register_forward_pre_hook(lambda *_: None)
    assert not fast._fused(x)
    handle.remove()
    assert fast._fused(x)


@pytest.fixture(autouse=True)
def no_spare_buffers():
    """Every test starts and ends without a spare H buffer (the workspace is process-wide)."""
    kernels.WORKSPACE.clear()
    yield
    kernels.WORKSPACE.clear()


def _train_steps(model, x, mask, y, steps: int, fresh_buffers: bool) -> list[int]:
    """Adam steps from a fixed seed; returns the address of H's buffer at each step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(11)
    addresses = []
    for _ in range(steps):
        if fresh_buffers:
            kernels.WORKSPACE.clear()
        opt.zero_grad(set_to_none=True)
        loss, _ = model.loss(x, mask, y)
        loss.backward()
        opt.step()
        spare = kernels.WORKSPACE._spare.get((x.device, x.dtype, model.proj.out_features))
        addresses.append(spare.data_ptr() if spare is not None else 0)
    return addresses


def test_the_reused_h_buffer_gives_the_same_training(monkeypatch) -> None:
    """H's buffer is handed from one step to the next (no fresh 40 MB per step at 10k
    instances) and training is bit-identical to fresh buffers, bags of varying length too."""
    monkeypatch.setattr(kernels, "CHUNK_ROWS", 64)
    reused, fresh, x, mask, y = _model_pair("distinct")
    fresh._forward_hooks.clear()
    fresh.proj._forward_hooks.clear()  # both fast: only the buffers differ
    addresses = _train_steps(reused, x, mask, y, 4, fresh_buffers=False)
    assert len(set(addresses)) == 1 and addresses[0] != 0  # one buffer, kept across steps
    _train_steps(fresh, x, mask, y, 4, fresh_buffers=True)
    for (name, a), (_, b) in zip(reused.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # A shorter bag takes the front rows of the spare buffer, and trains as with a fresh one.
    spare = kernels.WORKSPACE._spare[(x.device, x.dtype, reused.proj.out_features)].data_ptr()
    short_x, short_mask = x[:, :90], mask[:, :90]
    assert _train_steps(reused, short_x, short_mask, y, 1, fresh_buffers=False) == [spare]
    _train_steps(fresh, short_x, short_mask, y, 1, fresh_buffers=True)
    for (name, a), (_, b) in zip(reused.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # The end of a fit hands the buffer back to the allocator.
    reused.finish_training()
    assert not kernels.WORKSPACE._spare


def test_a_retained_graph_never_reads_a_reused_buffer() -> None:
    """A graph kept for a second backward still holds H; once the next step has written its
    own H into that buffer, the old backward fails loudly instead of using the new values."""
    model, _, x, mask, y = _model_pair("distinct")
    old, _ = model.loss(x, mask, y)
    old.backward(retain_graph=True)  # gives H's buffer back while the graph still holds it
    model.loss(x, mask, y)[0].backward()  # the next step writes into that buffer
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        old.backward()
