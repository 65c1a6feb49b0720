"""CLAM-SB's smooth top-1 SVM instance loss (Berrada et al., ICLR 2018), on tiny seeded data.

The CLAM tests every model gets are in test_models.py and the clustering / tiny-bag tests in
test_baselines.py; these cover the loss function and the instance_loss / svm_* params.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from micromil_core.errors import ConfigError
from micromil_core.models import build_model, model_config, params_from_dict
from micromil_core.models.clam import CLAMSB, smooth_top1_svm
from tests.conftest import assert_per_bag_gradients
from tests.conftest import ragged_batch as ragged

D, C = 6, 2
SMALL = {"embed_dim": 8, "attn_dim": 8, "k_sample": 2}


def make(seed: int = 0, **extra) -> CLAMSB:
    torch.manual_seed(seed)
    return build_model("clam-sb", D, C, {**SMALL, **extra})


def hinge(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """Multi-class hinge max_j(alpha [j != y] + s_j) - s_y, written as a plain loop."""
    out = []
    for s, y in zip(logits.tolist(), target.tolist(), strict=True):
        out.append(max(alpha * (j != y) + s_j for j, s_j in enumerate(s)) - s[y])
    return torch.tensor(out, dtype=torch.float64)


# --- the loss function -------------------------------------------------------------------


def test_smooth_svm_matches_hand_computed_values() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    # Row 0, y = 0: exponents (alpha [j != y] + s_j - s_y) / tau = 0, -0.5, -2 at tau = 1.
    # Row 1, y = 2: 1 + 0 - 1, 1 + 3 - 1, 0 = 0, 3, 0.
    expected = [math.log(1 + math.exp(-0.5) + math.exp(-2)), math.log(2 + math.exp(3))]
    got = smooth_top1_svm(logits, y, tau=1.0, alpha=1.0)
    torch.testing.assert_close(got, torch.tensor(expected))
    # tau = 0.5, alpha = 2, row 0: exponents 0, (2 + 0.5 - 2) / 0.5 = 1, (2 - 1 - 2) / 0.5 = -2.
    got = smooth_top1_svm(logits[:1], y[:1], tau=0.5, alpha=2.0)
    torch.testing.assert_close(got, torch.tensor([0.5 * math.log(1 + math.e + math.exp(-2))]))


def test_smooth_svm_with_no_margin_is_cross_entropy() -> None:
    # tau = 1, alpha = 0: log sum_j exp(s_j - s_y) is exactly the softmax cross-entropy.
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(20, 3, generator=g), torch.randint(0, 3, (20,), generator=g)
    torch.testing.assert_close(
        smooth_top1_svm(logits, y, tau=1.0, alpha=0.0),
        F.cross_entropy(logits, y, reduction="none"),
    )


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_smooth_svm_tends_to_the_hinge_as_tau_shrinks(alpha: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(50, 4, generator=g, dtype=torch.float64)  # (M, C)
    y = torch.randint(0, 4, (50,), generator=g)
    exact = hinge(logits, y, alpha)
    gaps = []
    for tau in (1.0, 1e-1, 1e-2, 1e-4):
        gap = smooth_top1_svm(logits, y, tau=tau, alpha=alpha) - exact  # (M,)
        # Log-sum-exp exceeds the max by at least 0 and at most log(C).
        assert torch.all(gap >= -1e-12) and torch.all(gap <= tau * math.log(4) + 1e-12), tau
        gaps.append(float(gap.max()))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3


def test_smooth_svm_gradients_finite_at_extreme_scales() -> None:
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    for tau in (1e-3, 1.0):
        loss = smooth_top1_svm(logits, y, tau=tau).sum()
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.all(torch.isfinite(grad)), tau
        # Each row's gradient sums to 0 (a shift of all scores changes nothing).
        torch.testing.assert_close(grad.sum(1), torch.zeros(3))


def test_smooth_svm_rejects_non_positive_tau() -> None:
    with pytest.raises(ValueError, match="tau=0"):
        smooth_top1_svm(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), tau=0)


# --- in CLAM-SB ---------------------------------------------------------------------------


def test_default_instance_loss_is_the_smooth_svm() -> None:
    p = params_from_dict("clam-sb")
    assert (p.instance_loss, p.svm_tau, p.svm_alpha) == ("svm", 1.0, 1.0)
    model = make(dropout=0.0).train()
    x, mask = ragged([6, 4])
    y = torch.tensor([1, 0])
    enc, h = model._attend(x, mask)
    assert model.loss(x, mask, y)[1]["instance"] > 0
    ce_model = make(dropout=0.0, instance_loss="ce").train()
    svm_part = model.instance_loss(h, enc.scores, mask, y)
    ce_part = ce_model.instance_loss(h, enc.scores, mask, y)
    # Same head, same picks: softplus(1 + m) > softplus(m) instance by instance.
    assert svm_part > ce_part


def test_instance_loss_is_per_bag() -> None:
    """Bag A's share of the loss (and its gradient) does not depend on the other bags."""
    model = make(dropout=0.0).train()
    x, mask = ragged([6, 3], seed=0, pad_to=6)
    other, other_mask = ragged([6, 9], seed=5, pad_to=9)
    y = torch.tensor([1, 0])

    def share_of_a(xb: torch.Tensor, mb: torch.Tensor, yb: torch.Tensor):
        xb = xb.clone().requires_grad_(True)
        loss = model.loss(xb, mb, yb)[0] * len(yb)  # sum over bags
        (grad,) = torch.autograd.grad(loss, xb)
        return grad[0, :6]  # (6, D): gradient at bag A's instances

    a_alone = model.loss(x[:1, :6], mask[:1, :6], y[:1])[0]
    b_alone = model.loss(x[1:, :3], mask[1:, :3], y[1:])[0]
    torch.testing.assert_close(model.loss(x, mask, y)[0] * 2, a_alone + b_alone)
    # Swap bag B for a longer bag of the other class (wider padding): A's gradient holds.
    xa = torch.cat([x[:1], x.new_zeros(1, 3, D)], dim=1)  # (1, 9, D)
    mixed = torch.cat([xa, other[1:]]), torch.cat([F.pad(mask[:1], (0, 3)), other_mask[1:]])
    torch.testing.assert_close(
        share_of_a(x, mask, y), share_of_a(*mixed, torch.tensor([1, 1])), atol=1e-6, rtol=1e-5
    )


def test_opacus_per_bag_gradients_with_svm() -> None:
    assert_per_bag_gradients(lambda: make(dropout=0.0), [5, 1, 7], torch.tensor([0, 1, 1]))


def test_clam_trains_with_the_svm_loss() -> None:
    x, mask = ragged([8, 5, 12, 7, 9, 6, 10, 4], seed=1)
    y = torch.tensor([0, 1] * 4)
    x[y == 1, :3, :2] += 2.0  # a few key instances in each positive bag
    model = make(dropout=0.1, instance_loss="svm")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def parts() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            loss, p = model.loss(x, mask, y)
        return float(loss), p["instance"]

    before, inst_before = parts()
    for _ in range(40):
        model.train()
        opt.zero_grad()
        model.loss(x, mask, y)[0].backward()
        opt.step()
    after, inst_after = parts()
    assert after < 0.6 * before and inst_after < inst_before, (before, after)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"instance_loss": "hinge"}, "instance_loss='hinge' is not one of svm, ce"),
        ({"svm_tau": 0.0}, "svm_tau=0.0"),
        ({"svm_tau": -1.0}, "svm_tau=-1.0"),
        ({"svm_alpha": -0.5}, "svm_alpha=-0.5"),
        ({"svm_alpha": True}, "svm_alpha=True"),
    ],
)
def test_bad_svm_params_raise_config_error(params: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        build_model("clam-sb", D, C, params)


def test_svm_params_from_cli_strings() -> None:
    p = params_from_dict("clam-sb", {"instance_loss": "ce", "svm_tau": "0.5", "svm_alpha": "2"})
    assert (p.instance_loss, p.svm_tau, p.svm_alpha) == ("ce", 0.5, 2.0)
    assert isinstance(p.svm_alpha, float)


def test_eval_is_deterministic_and_independent_of_the_instance_loss() -> None:
    svm, ce = make(instance_loss="svm").eval(), make(instance_loss="ce").eval()
    x, mask = ragged([5, 2, 7])
    first = svm.predict(x, mask)
    torch.testing.assert_close(svm.predict(x, mask).probs, first.probs, rtol=0, atol=0)
    # The choice is a training loss only: same weights, same checkpoint keys, same outputs.
    assert svm.state_dict().keys() == ce.state_dict().keys()
    torch.testing.assert_close(ce.predict(x, mask).probs, first.probs, rtol=0, atol=0)
    torch.testing.assert_close(ce.predict(x, mask).instance_scores, first.instance_scores)
    cfg = model_config(svm)
    assert cfg["params"]["instance_loss"] == "svm"
    rebuilt = build_model(**cfg)
    rebuilt.load_state_dict(svm.state_dict())
    torch.testing.assert_close(rebuilt.eval().predict(x, mask).probs, first.probs)


# --- subtyping: the out-of-class term ------------------------------------------------------


def subtype_model(**extra) -> CLAMSB:
    torch.manual_seed(0)
    return build_model("clam-sb", D, 3, {**SMALL, "dropout": 0.0, "instance_loss": "ce", **extra})


def test_subtyping_adds_the_other_classes_out_of_class_terms_by_hand() -> None:
    model = subtype_model(subtyping=True).train()
    x, mask = ragged([6, 3])
    y = torch.tensor([2, 0])
    enc, h = model._attend(x, mask)
    expected = []
    for b, label in enumerate(y.tolist()):
        n = int(mask[b].sum())
        k = min(SMALL["k_sample"], n // 2)
        order = torch.argsort(enc.scores[b, :n], descending=True, stable=True)
        top, bottom = order[:k], order.flip(0)[:k]
        logits = model.instance_head(h[b, :n]).view(n, 3, 2)  # (n, C, 2)
        ones, zeros = torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
        in_class = F.cross_entropy(logits[torch.cat([top, bottom]), label],
                                   torch.cat([ones, zeros]))
        out_of_class = [F.cross_entropy(logits[top, c], zeros) for c in range(3) if c != label]
        expected.append((in_class + sum(out_of_class)) / 3)
    got = model.instance_loss(h, enc.scores, mask, y)
    torch.testing.assert_close(got, torch.stack(expected).mean())
    # Without subtyping only the in-class term counts, so the loss differs.
    plain = subtype_model(subtyping=False)
    plain.load_state_dict(model.state_dict())
    assert not torch.isclose(plain.instance_loss(h, enc.scores, mask, y), got)


def test_subtyping_keeps_one_gradient_per_bag() -> None:
    assert_per_bag_gradients(lambda: subtype_model(subtyping=True), [5, 1, 7], torch.tensor([0, 2, 1]))


def test_subtyping_from_cli_strings_and_bad_values() -> None:
    assert params_from_dict("clam-sb", {"subtyping": "true"}).subtyping is True
    assert params_from_dict("clam-sb").subtyping is False
    with pytest.raises(ConfigError, match="subtyping"):
        build_model("clam-sb", D, 3, {"subtyping": "maybe"})
