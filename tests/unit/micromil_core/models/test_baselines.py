"""Logic tests of the TransMIL, DSMIL and CLAM-SB baselines, on tiny seeded data.

The shape / padding / determinism / gradient / toy-task tests every model gets are in
test_models.py (CONFIGS); these cover what is particular to each baseline.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from micromil_core.config import TrainConfig
from micromil_core.data.bag import Bag
from micromil_core.models import build_model
from micromil_core.models.base import MILModel
from micromil_core.models.clam import clustering_targets
from micromil_core.models.transmil import square_layout
from micromil_core.training.trainer import fit
from tests.conftest import assert_per_bag_gradients
from tests.conftest import ragged_batch as ragged

D, C = 6, 2
SMALL = {
    "transmil": {"dim": 8, "n_heads": 2},
    "dsmil": {"embed_dims": "8", "q_dim": 8},
    "clam-sb": {"embed_dim": 8, "attn_dim": 8, "k_sample": 2},
}
NAMES = sorted(SMALL)


def make(name: str, seed: int = 0, **extra) -> MILModel:
    torch.manual_seed(seed)
    return build_model(name, D, C, {**SMALL[name], **extra})


# --- all three ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_encode_shapes(name: str) -> None:
    model = make(name).eval()
    x, mask = ragged([5, 1, 7])
    enc = model.encode(x, mask)
    width = {"transmil": 8, "dsmil": C * 8, "clam-sb": 8}[name]
    assert enc.logits.shape == (3, C) and enc.bag.shape == (3, width)
    assert enc.scores.shape == (3, 7) and torch.all(enc.scores[~mask] == 0)
    torch.testing.assert_close(enc.scores.sum(1), torch.ones(3))
    torch.testing.assert_close(enc.logits, model(x, mask))


@pytest.mark.parametrize("name", NAMES)
def test_mask_with_holes_equals_the_bag_without_them(name: str) -> None:
    # MHIM hides instances anywhere in a bag, not only at the end.
    model = make(name).eval()
    x, mask = ragged([7, 4])
    holed = mask.clone()
    holed[0, [1, 4]] = False
    keep = [0, 2, 3, 5, 6]
    got = model.predict(x, holed)
    alone = model.predict(x[:1, keep], torch.ones(1, len(keep), dtype=torch.bool))
    torch.testing.assert_close(got.probs[:1], alone.probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.instance_scores[0, keep], alone.instance_scores[0])
    assert torch.all(got.instance_scores[0, [1, 4]] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_opacus_per_bag_gradients(name: str) -> None:
    from micromil_core.privacy.dp_sgd import make_private_model

    # The model's full loss, auxiliary terms too: every term is a mean over bags.
    build = lambda: make_private_model(make(name, dropout=0.0))  # noqa: E731
    assert_per_bag_gradients(build, [5, 1, 7], torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("name", NAMES)
def test_fit_runs_like_micromil_cv(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    bags = []
    for i in range(20):
        n = 1 + i % 6
        feats = torch.randn(n, D, generator=g)
        feats[:, 0] += 2.0 * (i % 2)
        bags.append(Bag(f"p{i}", feats, label=i % 2))
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=4, patience=0, select_on="auc")
    model = make(name)
    result = fit(model, bags[:16], bags[16:], cfg, torch.device("cpu"))
    assert len(result.history) == 2 and 1 <= result.best_epoch <= 2
    assert all(torch.isfinite(torch.tensor(e.train_loss)) for e in result.history)


# --- TransMIL -----------------------------------------------------------------------------


def test_square_layout_is_per_bag() -> None:
    mask = torch.arange(10)[None, :] < torch.tensor([[3], [10], [1]])  # (3, 10)
    layout = square_layout(mask)
    assert layout.size == 4  # ceil(sqrt(10))
    assert layout.valid.sum(1).tolist() == [4, 16, 1]  # each bag's own square
    # Padding repeats the bag's own first instances, never another row's or padding.
    assert layout.source[0, :4].tolist() == [0, 1, 2, 0]
    assert layout.source[1, :16].tolist() == list(range(10)) + list(range(6))
    assert layout.source[2, :1].tolist() == [0]
    # Bag 0's 2x2 grid sits in the canvas corner: cells (0,0) (0,1) (1,0) (1,1).
    assert layout.cell[0, :4].tolist() == [0, 1, 4, 5]
    assert layout.cell_valid[0].sum() == 4 and layout.cell_token[0, [0, 1, 4, 5]].tolist() == [
        0,
        1,
        2,
        3,
    ]


def test_transmil_bag_alone_equals_bag_beside_a_longer_one() -> None:
    # 3 instances -> 2x2 grid, 11 -> 4x4 grid: the short bag's PPEG must not see the canvas.
    model = make("transmil").eval()
    x, mask = ragged([3, 11, 1])
    batched = model.predict(x, mask)
    for i, n in enumerate([3, 11, 1]):
        alone = model.predict(x[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(batched.probs[i : i + 1], alone.probs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(batched.instance_scores[i : i + 1, :n], alone.instance_scores)


# --- DSMIL --------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_dsmil_never_picks_a_padded_critical_instance(training: bool) -> None:
    model = make("dsmil")
    with torch.no_grad():  # instance logits grow with the feature sum: padding (+50) would win
        model.embed[0].weight.fill_(1.0)
        model.instance_head.weight.fill_(1.0)
    x, mask = ragged([2, 4, 1], pad_to=6)
    x = torch.where(mask[..., None], x, torch.full_like(x, 50.0))
    out = model.train(training).run(x, mask)
    assert torch.all(out.critical < mask.sum(1, keepdim=True))
    assert torch.all(out.attention[~mask] == 0)
    assert torch.isfinite(out.max_logits).all()


def test_dsmil_loss_parts() -> None:
    model = make("dsmil", bag_weight=0.3).eval()
    x, mask = ragged([5, 2, 4])
    y = torch.tensor([1, 0, 1])
    loss, parts = model.loss(x, mask, y)
    assert loss.item() == pytest.approx(0.3 * parts["ce"] + 0.7 * parts["max_ce"], rel=1e-6)
    with torch.no_grad():
        out = model.run(x, mask)
        inst = model.instance_head(model.embed(x))  # (B, N, C)
    max_logits = torch.stack([inst[i, :n].amax(0) for i, n in enumerate([5, 2, 4])])
    assert parts["max_ce"] == pytest.approx(float(F.cross_entropy(max_logits, y)), rel=1e-6)
    assert parts["ce"] == pytest.approx(float(F.cross_entropy(out.logits, y)), rel=1e-6)
    default = make("dsmil").eval()
    loss, parts = default.loss(x, mask, y)
    assert loss.item() == pytest.approx(0.5 * (parts["ce"] + parts["max_ce"]), rel=1e-6)


# --- CLAM-SB ------------------------------------------------------------------------------


def test_clustering_targets_cap_k_per_bag() -> None:
    attention = torch.tensor(
        [[0.1, 0.5, 0.2, 0.15, 0.05, 0.0], [0.3, 0.7, 0.0, 0.0, 0.0, 0.0], [1.0, 0, 0, 0, 0, 0]]
    )
    mask = attention > 0
    mask[0, 5] = False
    index, target, valid = clustering_targets(attention, mask, k_sample=8)
    # k = min(8, n // 2) = 2, 1, 0 for n = 5, 2, 1; width K = 2.
    assert index.shape == target.shape == valid.shape == (3, 4)
    assert valid.sum(1).tolist() == [4, 2, 0]
    assert target[0].tolist() == [1, 1, 0, 0]
    assert index[0].tolist() == [1, 2, 4, 0]  # top-2 by attention, then the 2 least attended
    assert index[1][valid[1]].tolist() == [1, 0]  # top-1 and bottom-1 differ
    assert torch.all(mask.gather(1, index)[valid])  # padding never selected


def test_clam_instance_loss_on_tiny_bags() -> None:
    model = make("clam-sb", k_sample=8).train()
    x, mask = ragged([3, 1])  # N < 2k, and N = 1
    y = torch.tensor([1, 0])
    loss, parts = model.loss(x, mask, y)
    assert loss.item() == pytest.approx(0.7 * parts["ce"] + 0.3 * parts["instance"], rel=1e-6)
    assert parts["instance"] > 0
    loss.backward()
    assert model.instance_head.weight.grad.abs().sum() > 0
    # A batch of one-instance bags has no pairs to cluster: instance loss exactly 0.
    model.zero_grad()
    loss, parts = model.loss(x[1:, :1], mask[1:, :1], y[1:])
    assert parts["instance"] == 0.0 and loss.item() == pytest.approx(0.7 * parts["ce"])
    loss.backward()
    assert torch.all(model.instance_head.weight.grad == 0)


def test_dsmil_prediction_mixes_both_streams() -> None:
    # Through the public API only: the same weights with bag_weight 1 (bag stream alone)
    # and 0 (max-instance stream alone) bound the mix, which is linear in bag_weight, and
    # the two streams really differ (or the mix would prove nothing).
    x, mask = ragged([5, 2, 4])
    probs = {w: make("dsmil", bag_weight=w).eval().predict(x, mask).probs for w in (0.0, 0.3, 1.0)}
    assert not torch.allclose(probs[0.0], probs[1.0], atol=1e-3)
    torch.testing.assert_close(probs[0.3], 0.3 * probs[1.0] + 0.7 * probs[0.0])
