"""TransMIL's Nystrom attention (Xiong et al. 2021) and the exact / nystrom / auto switch.

Tiny seeded data. Bags of 30-50 instances (37-50 tokens with the class token and the
square grid) against 4 landmarks, so the Nystrom path really approximates; bags of at
most ``landmarks`` tokens take exact attention in every mode.
"""

from __future__ import annotations

import pytest
import torch

from micromil_core.errors import ConfigError
from micromil_core.models import build_model, params_from_dict
from micromil_core.models.base import MILModel
from micromil_core.models.transmil import TransMIL
from micromil_core.nn import masked_softmax
from micromil_core.nn.nystrom import nystrom_attention, segment_weights
from tests.conftest import assert_per_bag_gradients
from tests.conftest import ragged_batch as ragged

D, C = 6, 2
SMALL = {"dim": 8, "n_heads": 2, "landmarks": 4}


def make(seed: int = 0, **params) -> TransMIL:
    torch.manual_seed(seed)
    model = build_model("transmil", D, C, {**SMALL, **params})
    assert isinstance(model, TransMIL)
    return model


def same_weights(model: MILModel, **params) -> TransMIL:
    """A copy of ``model`` with other attention params."""
    other = make(**params)
    other.load_state_dict(model.state_dict())
    return other.eval()


def exact_attention(q, k, v, key_mask):
    """Shapes: q, k, v (B, H, T, d), key_mask (B, T) -> (B, H, T, d)"""
    return masked_softmax(q @ k.transpose(-1, -2), key_mask[:, None, None, :]) @ v


# --- the attention function ----------------------------------------------------------------


def test_segment_weights_split_each_bags_real_tokens() -> None:
    x = torch.arange(7.0)[None, :, None].expand(2, 7, 1)  # (2, 7, 1): token index as value
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    means = segment_weights(mask, 3, x.dtype) @ x  # (2, 3, 1)
    # Rank r of n real tokens -> segment floor(3 r / n): 7 tokens -> {0,1,2} {3,4} {5,6};
    # the holed bag's 4 real tokens (0, 2, 3, 5) -> {0, 2} {3} {5}.
    assert means[0, :, 0].tolist() == [1.0, 3.5, 5.5]
    assert means[1, :, 0].tolist() == [1.0, 3.0, 5.0]


def test_nystrom_with_a_landmark_per_token_is_exact_attention() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [12, 9]
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]  # (2, 12)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=g) for _ in range(3))  # (B, H, T, d)
    q = q * 8**-0.5
    for i, n in enumerate(lengths):  # one landmark per token: F = A = B, F pinv(A) B = A
        sl = (slice(i, i + 1), slice(None), slice(0, n))
        got, row0 = nystrom_attention(q[sl], k[sl], v[sl], mask[i : i + 1, :n], n, 20)
        want = exact_attention(q[sl], k[sl], v[sl], mask[i : i + 1, :n])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        attn = torch.softmax(q[sl] @ k[sl].transpose(-1, -2), dim=-1)  # (1, H, n, n)
        torch.testing.assert_close(row0, attn[:, :, 0], atol=1e-4, rtol=0)
    # The paper's 6 iterations are an approximation of the pseudo-inverse, not exact.
    sl = (slice(0, 1), slice(None))
    got6, _ = nystrom_attention(q[sl], k[sl], v[sl], mask[:1], 12, 6)
    assert (got6 - exact_attention(q[sl], k[sl], v[sl], mask[:1])).abs().max() > 1e-3


def test_nystrom_is_exact_when_queries_are_constant_on_segments() -> None:
    # If every token's query equals its segment's, F pinv(A) selects that segment's row of
    # B, which is the exact attention row over ALL keys (padded ones masked).
    g = torch.Generator().manual_seed(1)
    m, per, pad = 5, 4, 7
    n_tok = m * per + pad
    q = torch.randn(1, 2, m, 8, generator=g).repeat_interleave(per, dim=2) * 8**-0.5
    q = torch.cat([q, 50 * torch.randn(1, 2, pad, 8, generator=g)], dim=2)  # (1, H, T, d)
    k, v = (torch.randn(1, 2, n_tok, 8, generator=g) for _ in range(2))  # garbage past m*per
    k[:, :, m * per :] *= 50
    mask = torch.arange(n_tok)[None, :] < m * per  # (1, T)
    got, _ = nystrom_attention(q, k, v, mask, m, 20)
    want = exact_attention(q, k, v, mask)
    torch.testing.assert_close(got[:, :, : m * per], want[:, :, : m * per], atol=1e-4, rtol=0)


def test_nystrom_refuses_bags_smaller_than_its_landmarks() -> None:
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="landmarks=4"):
        nystrom_attention(q, q, q, torch.ones(1, 3, dtype=torch.bool), 4, 6)


# --- TransMIL with attention=nystrom -------------------------------------------------------


def test_encode_shapes_and_scores() -> None:
    model = make(attention="nystrom").eval()
    x, mask = ragged([30, 1, 50])
    enc = model.encode(x, mask)
    assert enc.logits.shape == (3, C) and enc.bag.shape == (3, 8) and enc.scores.shape == (3, 50)
    assert torch.all(enc.scores[~mask] == 0) and torch.all(enc.scores >= 0)
    torch.testing.assert_close(enc.scores.sum(1), torch.ones(3))
    torch.testing.assert_close(enc.logits, model(x, mask))
    # Nystrom really ran: the exact model with the same weights differs on the big bags.
    exact = same_weights(model, attention="exact").encode(x, mask)
    assert not torch.allclose(enc.logits[[0, 2]], exact.logits[[0, 2]], atol=1e-4)
    torch.testing.assert_close(enc.logits[1], exact.logits[1])  # 2 tokens <= 4 landmarks


def test_bag_alone_equals_bag_in_a_padded_batch() -> None:
    model = make(attention="nystrom").eval()
    lengths = [30, 5, 50, 1]
    x, mask = ragged(lengths, pad_to=60)
    batched = model.predict(x, mask)
    for i, n in enumerate(lengths):
        alone = model.predict(x[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(batched.probs[i : i + 1], alone.probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            batched.instance_scores[i : i + 1, :n], alone.instance_scores, atol=1e-5, rtol=1e-4
        )


def test_mask_with_holes_equals_the_bag_without_them() -> None:
    model = make(attention="nystrom").eval()
    x, mask = ragged([40, 30])
    holed = mask.clone()
    holed[0, [1, 4, 17]] = False
    keep = [i for i in range(40) if i not in (1, 4, 17)]
    got = model.predict(x, holed)
    alone = model.predict(x[:1, keep], torch.ones(1, len(keep), dtype=torch.bool))
    torch.testing.assert_close(got.probs[:1], alone.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.instance_scores[0, keep], alone.instance_scores[0])
    assert torch.all(got.instance_scores[0, [1, 4, 17]] == 0)


def test_eval_is_deterministic() -> None:
    model = make(attention="nystrom").eval()
    x, mask = ragged([30, 50])
    a, b = model.predict(x, mask), model.predict(x, mask)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.instance_scores, b.instance_scores)


def test_gradients_reach_every_parameter() -> None:
    model = make(attention="nystrom").train()
    x, mask = ragged([30, 50])
    loss, _ = model.loss(x, mask, torch.tensor([0, 1]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_auto_switches_per_bag_at_the_threshold() -> None:
    # 16 instances -> 1 + 4*4 = 17 tokens: exact; 17 instances -> 1 + 5*5 = 26: Nystrom.
    model = make(attention="auto", nystrom_threshold=17).eval()
    exact = same_weights(model, attention="exact")
    nystrom = same_weights(model, attention="nystrom")
    x, mask = ragged([16, 17], pad_to=20)
    got = model.encode(x, mask)
    for i, n, want_model in ((0, 16, exact), (1, 17, nystrom)):
        want = want_model.encode(x[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(got.logits[i : i + 1], want.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.scores[i : i + 1, :n], want.scores, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(
        exact.encode(x[1:], mask[1:]).logits, nystrom.encode(x[1:], mask[1:]).logits, atol=1e-4
    )


def test_auto_is_exact_below_the_threshold_by_default() -> None:
    model = make().eval()
    assert model.params.attention == "auto" and model.params.nystrom_threshold == 2048
    x, mask = ragged([30, 50])
    exact = same_weights(model, attention="exact")
    assert torch.equal(model(x, mask), exact(x, mask))


def test_a_bag_of_20000_instances_trains_without_quadratic_memory() -> None:
    # Exact attention would keep (H, T, T) = 2 x 20165^2 floats (3.3 GB) per layer for the
    # backward pass; count what autograd actually keeps.
    model = make(dim=16, n_heads=2, landmarks=32, attention="nystrom").train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20_000, D, generator=g)
    mask = torch.ones(1, 20_000, dtype=torch.bool)
    n_tok = 1 + 142**2  # class token + the 142 x 142 grid
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(x, mask, torch.tensor([1]))
    loss.backward()
    assert largest < n_tok * n_tok // 100  # linear in T: here (H, T, m) = 1.3 M floats
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_opacus_per_bag_gradients() -> None:
    from micromil_core.privacy.dp_sgd import make_private_model

    # 30 and 50 instances take Nystrom, the 1-instance bag (2 tokens) exact: a mixed batch.
    build = lambda: make_private_model(make(attention="nystrom", dropout=0.0))  # noqa: E731
    assert_per_bag_gradients(build, [30, 1, 50], torch.tensor([0, 1, 1]))


# --- params --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"attention": "linformer"}, "attention='linformer' is not one of exact, nystrom, auto"),
        ({"landmarks": 0}, "landmarks=0 must be an int >= 1"),
        ({"pinv_iterations": 0}, "pinv_iterations=0"),
        ({"nystrom_threshold": -1}, "nystrom_threshold=-1"),
        ({"landmarks": "many"}, "landmarks"),
        ({"landmarks": True}, "landmarks"),
    ],
)
def test_bad_attention_params_raise_config_error(params: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_model("transmil", D, C, params)


def test_attention_params_from_cli_strings() -> None:
    values = {"attention": "nystrom", "landmarks": "64", "pinv_iterations": "8"}
    p = params_from_dict("transmil", {**values, "nystrom_threshold": "4096"})
    assert (p.attention, p.landmarks, p.pinv_iterations) == ("nystrom", 64, 8)
    assert p.nystrom_threshold == 4096
