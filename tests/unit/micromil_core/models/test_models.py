"""Shape and logic tests of the MIL models and their registry, on tiny seeded data."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import micromil_core.models.micromil_selection as micromil_selection
from micromil_core.errors import ConfigError, UnknownNameError
from micromil_core.models import (
    build_model,
    model_config,
    model_names,
    model_specs,
    params_from_dict,
    register_model,
)
from micromil_core.models import registry as registry_mod
from micromil_core.models.base import MILModel
from micromil_core.models.micromil import MicroMIL, dec_kl, switch_gnn_backend
from micromil_core.nn.gat import GAT, convert_gat_state
from tests.conftest import assert_per_bag_gradients, ragged_batch

D, C = 6, 2
SMALL_MICROMIL = {"n_clusters": 4, "gnn_hidden": 8, "top_k": 2}

# (name, params) for every registered model; micromil in all backend x edge-mode variants.
CONFIGS = [
    ("mean-pool", {"hidden_dim": 8}),
    ("max-pool", {"hidden_dim": 8}),
    ("abmil", {"embed_dims": "16,8", "attn_dim": 8}),
    ("gated-abmil", {"embed_dims": "16,8", "attn_dim": 8}),
    ("transmil", {"dim": 8, "n_heads": 2}),
    ("dsmil", {"embed_dims": "8", "q_dim": 8}),
    ("clam-sb", {"embed_dim": 8, "attn_dim": 8, "k_sample": 2}),
    ("hmil", {"fine_to_coarse": "0,0,1", "embed_dims": "16,8", "fine_dim": 8, "attn_dim": 8}),
    ("mran", {"n_scales": 1, "embed_dims": "16,8"}),  # multi-scale paths: test_mran.py
] + [
    ("micromil", {**SMALL_MICROMIL, "gnn_backend": backend, "edge_mode": mode})
    for backend in ("pyg", "dense")
    for mode in ("paper", "gumbel-neighbour")
] + [  # MHIM masks from the first step (warmup 0), so these tests reach its training path
    ("mhim", {"base_params": {"embed_dims": "16,8", "attn_dim": 8}, "warmup": 0,
              "recycle_tokens": 2}),
    ("mhim", {"base": "micromil", "base_params": {**SMALL_MICROMIL, "gnn_backend": "dense"},
              "warmup": 0}),
    ("mhim", {"base": "transmil", "base_params": {"dim": 8, "n_heads": 2}, "warmup": 0}),
    ("mhim", {"base": "dsmil", "base_params": {"embed_dims": "8", "q_dim": 8}, "warmup": 0}),
]
IDS = [
    "-".join(str(v) for v in (n, p.get("base"), p.get("gnn_backend"), p.get("edge_mode")) if v)
    for n, p in CONFIGS
]


def make_model(name: str, params: dict, seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    return build_model(name, D, C, params)


def test_every_registered_model_is_tested() -> None:
    assert sorted({n for n, _ in CONFIGS}) == model_names()


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_output_shapes(name: str, params: dict) -> None:
    model = make_model(name, params).eval()
    x, mask = ragged_batch([5, 3, 7])
    assert model(x, mask).shape == (3, C)
    pred = model.predict(x, mask)
    assert pred.probs.shape == (3, C)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(3))
    if pred.instance_scores is not None:
        assert pred.instance_scores.shape == (3, 7)
        assert torch.all(pred.instance_scores[~mask] == 0)
    if name == "micromil":
        k = params["n_clusters"]
        lengths = mask.sum(1, keepdim=True)
        assert pred.selected.shape == (3, k) and torch.all(pred.selected < lengths)
        adj = pred.adjacency
        assert adj.shape == (3, k, k) and adj.dtype == torch.float32
        assert set(adj.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(adj, adj.transpose(1, 2))
        assert torch.all(adj.diagonal(dim1=1, dim2=2) == 1)
        q = pred.extras["assignments"]
        assert q.shape == (3, 7, k)
        torch.testing.assert_close(q.sum(-1), mask.float())


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_padding_and_batching_do_not_change_eval_output(name: str, params: dict) -> None:
    model = make_model(name, params).eval()
    lengths = [4, 2, 6]
    x, mask = ragged_batch(lengths, pad_to=9)
    batched = model.predict(x, mask)
    for i, n in enumerate(lengths):
        alone = model.predict(x[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(batched.probs[i : i + 1], alone.probs, atol=1e-6, rtol=1e-5)
        if alone.instance_scores is not None:
            torch.testing.assert_close(
                batched.instance_scores[i : i + 1, :n], alone.instance_scores, atol=1e-6, rtol=1e-5
            )
        if alone.selected is not None:
            assert torch.equal(batched.selected[i : i + 1], alone.selected)
            assert torch.equal(batched.adjacency[i : i + 1], alone.adjacency)


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_eval_is_deterministic(name: str, params: dict) -> None:
    model = make_model(name, params).eval()
    x, mask = ragged_batch([5, 3])
    a, b = model.predict(x, mask), model.predict(x, mask)
    assert torch.equal(a.probs, b.probs)
    if a.selected is not None:
        assert torch.equal(a.selected, b.selected) and torch.equal(a.adjacency, b.adjacency)


# Biases added equally to every entry of a softmax (an instance-score layer's bias before
# the softmax over instances; HMIL's one score bias shared by all coarse classes): softmax
# is shift-invariant, so their gradient is zero up to rounding, and exactly 0 on some CPUs.
SHIFT_INVARIANT = ("attn_w.bias", "attn_c.bias", "attn.w.bias", "coarse_score.bias")


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_gradients_reach_every_parameter(name: str, params: dict) -> None:
    model = make_model(name, params).train()
    x, mask = ragged_batch([5, 3, 7])
    loss, parts = model.loss(x, mask, torch.tensor([0, 1, 1]))
    loss.backward()
    assert "ce" in parts
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        if pname.endswith(SHIFT_INVARIANT):
            assert p.grad.abs().sum() < 1e-6, pname  # the reason it is exempt holds
        else:
            assert p.grad.abs().sum() > 0, pname


def separable_task(n_bags: int = 8, seed: int = 0):
    """Positive bags: every instance shifted by +2 on the first two features."""
    lengths = [3 + (i * 5) % 6 for i in range(n_bags)]
    x, mask = ragged_batch(lengths, seed=seed)
    y = torch.arange(n_bags) % 2
    x[y == 1, :, :2] += 2.0
    return x, mask, y


def eval_loss_before_after(model: MILModel, x, mask, y, steps: int) -> tuple[float, float]:
    """Eval-mode loss before and after ``steps`` full-batch Adam steps (lr 1e-2)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.loss(x, mask, y)[0])

    before = eval_loss()
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        model.loss(x, mask, y)[0].backward()
        opt.step()
    return before, eval_loss()


def with_low_dropout(name: str, params: dict) -> dict:
    low = {"dropout": 0.1}  # a wrapper (mhim) passes it on to its base model
    if name == "mhim":
        low = {"base_params": {**params["base_params"], **low}}
    return {**params, **low}


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_loss_decreases_on_separable_task(name: str, params: dict) -> None:
    x, mask, y = separable_task()
    model = make_model(name, with_low_dropout(name, params))
    before, after = eval_loss_before_after(model, x, mask, y, steps=30)
    assert after < 0.7 * before, (before, after)


@pytest.fixture(scope="module")
def musk1_subset():
    """16 real MUSK1 bags (8 per class; 166-d molecule features), standardised on themselves."""
    from micromil_core.data.bag import Bag, collate_bags
    from micromil_core.data.datasets import load_mil_csv
    from micromil_core.data.scaler import FeatureScaler

    raw = load_mil_csv("musk1")
    picked = [b for b in raw if b.label == 0][:8] + [b for b in raw if b.label == 1][:8]
    bags = [Bag(b.pid, torch.as_tensor(b.features), b.label) for b in picked]
    batch = collate_bags(FeatureScaler.fit(bags).transform_all(bags))
    return batch.x, batch.mask, batch.y


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_loss_decreases_on_tiny_real_subset(name: str, params: dict, musk1_subset) -> None:
    x, mask, y = musk1_subset
    torch.manual_seed(0)
    model = build_model(name, x.shape[-1], C, with_low_dropout(name, params))
    before, after = eval_loss_before_after(model, x, mask, y, steps=40)
    assert after < 0.7 * before, (before, after)


# --- registry ---------------------------------------------------------------------------


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_model("transmil-ish", D, C)
    for name in model_names():
        assert name in str(err.value)


def test_unknown_param_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("micromil", D, C, {"n_cluster": 3})
    for key in ("n_clusters", "tau", "edge_mode", "gnn_backend", "kl_weight"):
        assert key in str(err.value)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"n_clusters": "many"}, "n_clusters"),
        ({"n_clusters": 0}, "n_clusters"),
        ({"edge_mode": "knn"}, "gumbel-neighbour"),
        ({"gnn_backend": "cuda"}, "dense"),
        ({"dropout": 1.5}, "dropout"),
        ({"tau": True}, "tau"),
    ],
)
def test_bad_param_values_raise_config_error(params: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_model("micromil", D, C, params)


def test_bad_dims_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="n_classes"):
        build_model("abmil", D, 1)
    with pytest.raises(ConfigError, match="in_dim"):
        build_model("abmil", 0, C)


def test_string_params_from_cli_are_converted() -> None:
    p = params_from_dict(
        "micromil", {"n_clusters": "5", "tau": "0.5", "kl_weight": "1", "gnn_backend": "dense"}
    )
    assert (p.n_clusters, p.tau, p.kl_weight, p.gnn_backend) == (5, 0.5, 1.0, "dense")
    assert isinstance(p.tau, float) and isinstance(p.n_clusters, int)
    assert params_from_dict("abmil", {"embed_dims": "64, 32"}).embed_dims == (64, 32)
    assert params_from_dict("abmil", {"embed_dims": [64]}).embed_dims == (64,)


@dataclass(frozen=True)
class _ToyParams:
    flag: bool = False
    label: str = "x"


def test_bool_and_str_params_are_converted() -> None:
    @register_model("toy-for-test", _ToyParams, "test only")
    class Toy(MILModel):
        def __init__(self, in_dim: int, n_classes: int, params: _ToyParams) -> None:
            super().__init__()
            self.in_dim, self.n_classes, self.params = in_dim, n_classes, params

    try:
        assert build_model("toy-for-test", D, C, {"flag": "true", "label": "y"}).params == (
            _ToyParams(True, "y")
        )
        assert params_from_dict("toy-for-test", {"flag": "0"}).flag is False
        with pytest.raises(ConfigError, match="bool"):
            params_from_dict("toy-for-test", {"flag": "maybe"})
        with pytest.raises(ConfigError, match="string"):
            params_from_dict("toy-for-test", {"label": 3})
    finally:
        registry_mod._REGISTRY.pop("toy-for-test")


def test_model_specs_and_rebuild_from_config() -> None:
    specs = {s.name: s for s in model_specs()}
    assert specs["micromil"].defaults["n_clusters"] == 36
    assert all(s.description for s in specs.values())
    model = make_model("micromil", {**SMALL_MICROMIL, "gnn_backend": "dense"}).eval()
    cfg = model_config(model)
    assert cfg["name"] == "micromil" and cfg["params"]["gnn_backend"] == "dense"
    rebuilt = build_model(**cfg).eval()
    rebuilt.load_state_dict(model.state_dict())
    x, mask = ragged_batch([4, 6])
    torch.testing.assert_close(rebuilt(x, mask), model(x, mask))


def test_bad_batches_raise_config_error() -> None:
    model = make_model("abmil", {})
    x, mask = ragged_batch([3, 2])
    with pytest.raises(ConfigError, match="in_dim"):
        model(x[..., :4], mask)
    with pytest.raises(ConfigError, match="no instances"):
        model(x, mask & torch.tensor([[True], [False]]))


# --- MicroMIL specifics -----------------------------------------------------------------


def test_pyg_backend_leaves_no_template_file_in_the_temp_folder(tmp_path) -> None:
    # PyG renders its compiled propagate into the temp folder; a fresh process (as every
    # Flower message gets) must not leave it behind.
    code = (
        "import torch; from micromil_core.nn.gat import GAT; "
        "g = GAT(4, 8, 2, 0.0, 'pyg'); "
        "print(g(torch.randn(1, 5, 4), torch.ones(1, 5, 5)).shape)"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 5, 8])" in done.stdout  # the module works without its source file
    assert sorted(p.name for p in tmp_path.glob("*.py")) == []


def test_gat_backends_agree_on_the_same_graph() -> None:
    torch.manual_seed(0)
    pyg = GAT(5, 7, n_layers=2, dropout=0.5, backend="pyg").eval()
    dense = GAT(5, 7, n_layers=2, dropout=0.5, backend="dense").eval()
    dense.load_state_dict(convert_gat_state(pyg.state_dict(), "dense"))
    x = torch.randn(3, 6, 5)  # (B, K, C)
    adj = (torch.rand(3, 6, 6) < 0.4).float()  # directed on purpose: checks edge direction
    torch.testing.assert_close(dense(x, adj), pyg(x, adj), atol=1e-5, rtol=1e-5)
    back = convert_gat_state(dense.state_dict(), "pyg")
    for key, value in pyg.state_dict().items():
        assert torch.equal(back[key], value)


def test_gat_backends_drop_the_same_attention_under_a_seed() -> None:
    # Training mode: the dense backend draws its attention-dropout mask in PyG's edge
    # order, so the same seed drops the same coefficients (and the same features).
    torch.manual_seed(0)
    pyg = GAT(5, 7, n_layers=2, dropout=0.5, backend="pyg").train()
    dense = GAT(5, 7, n_layers=2, dropout=0.5, backend="dense").train()
    dense.load_state_dict(convert_gat_state(pyg.state_dict(), "dense"))
    x = torch.randn(3, 6, 5)
    adj = ((torch.rand(3, 6, 6) < 0.4) | torch.eye(6, dtype=torch.bool)).float()
    outs = []
    for model in (pyg, dense):
        torch.manual_seed(1)
        outs.append(model(x, adj))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)  # another seed drops other coefficients: the check can fail
    assert not torch.allclose(dense(x, adj), outs[1], atol=1e-3)


@pytest.mark.parametrize("mode", ["paper", "gumbel-neighbour"])
def test_micromil_backends_train_the_same_under_a_seed(mode: str) -> None:
    # Dropout 0.5 on (the default): five seeded steps give the same weights. SGD, because
    # Adam scales a gradient that is 0 up to rounding (layer 0's att_dst here: every logit
    # is positive, so the LeakyReLU is linear and a_dst cancels in the softmax) to a full
    # step whose sign is the rounding's.
    params = {**SMALL_MICROMIL, "edge_mode": mode, "dropout": 0.5}
    torch.manual_seed(0)
    pyg = make_model("micromil", {**params, "gnn_backend": "pyg"})
    dense = switch_gnn_backend(pyg, "dense")
    x, mask = ragged_batch([5, 2, 7])
    y = torch.tensor([0, 1, 1])
    for model in (pyg, dense):
        torch.manual_seed(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        for _ in range(5):
            opt.zero_grad()
            model.loss(x, mask, y)[0].backward()
            opt.step()
    trained = convert_gat_state(dense.state_dict(), "pyg")
    for key, value in pyg.state_dict().items():
        torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["paper", "gumbel-neighbour"])
def test_micromil_backends_agree(mode: str) -> None:
    model = make_model("micromil", {**SMALL_MICROMIL, "edge_mode": mode}).eval()
    dense = switch_gnn_backend(model, "dense").eval()
    assert dense.params.gnn_backend == "dense"
    x, mask = ragged_batch([5, 2, 7])
    torch.testing.assert_close(dense(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["pyg", "dense"])
def test_micromil_with_fewer_instances_than_clusters(backend: str) -> None:
    # The authors' draw repeats instances to fill K nodes; the default draw (tests in
    # test_micromil_selection.py) gives a bag of N < K instances N nodes instead.
    model = make_model("micromil", {"n_clusters": 5, "gnn_hidden": 8, "gnn_backend": backend,
                                    "selection": "released"})
    x, mask = ragged_batch([2, 1])
    model.train()
    model.loss(x, mask, torch.tensor([0, 1]))[0].backward()
    pred = model.eval().predict(x, mask)
    assert pred.selected.shape == (2, 5) and pred.adjacency.shape == (2, 5, 5)
    assert torch.all(pred.selected[0] < 2) and torch.all(pred.selected[1] == 0)


@pytest.mark.parametrize("training", [False, True])
def test_micromil_never_selects_padding(training: bool) -> None:
    # Every real instance gets a negative score; padded rows (score 0 before masking)
    # must still never win the argmax / Gumbel draw.
    model = make_model("micromil", {**SMALL_MICROMIL, "dropout": 0.0})
    with torch.no_grad():
        model.proj.weight.zero_()
        model.proj.bias.fill_(1.0)  # H = 1 for every instance
        model.score.weight.fill_(-1.0)  # a = w . H < 0
    x, mask = ragged_batch([2, 3], pad_to=6)
    model.train(training)
    selected = model.run(x, mask).selected  # (B, K)
    assert torch.all(selected < mask.sum(1, keepdim=True))


def test_micromil_kl_loss() -> None:
    model = make_model("micromil", {**SMALL_MICROMIL, "kl_weight": 0.5}).train()
    x, mask = ragged_batch([5, 3])
    torch.manual_seed(1)
    loss, parts = model.loss(x, mask, torch.tensor([0, 1]))
    assert parts["kl"] >= 0
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * parts["kl"], rel=1e-5)
    # KL alone trains the centroids (through q), padding excluded.
    q = model.assignments(model.project(x), mask)
    dec_kl(q, mask).backward()
    assert model.dce.centroids.grad.abs().sum() > 0


def test_init_centroids_from_data() -> None:
    model = make_model("micromil", SMALL_MICROMIL)
    x, mask = ragged_batch([5, 3])
    model.init_centroids_(x, mask, generator=torch.Generator().manual_seed(0))
    real = model.project(x)[mask]  # (M, P)
    dist = torch.cdist(model.dce.centroids.detach(), real.detach())  # (K, M)
    assert torch.all(dist.min(dim=1).values < 1e-5)


def test_opacus_per_bag_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    import opacus
    params = {**SMALL_MICROMIL, "gnn_backend": "dense", "dropout": 0.0, "kl_weight": 0.5}
    model = make_model("micromil", params).train()
    gsm = opacus.GradSampleModule(model, loss_reduction="sum")
    lengths = [5, 3, 7]
    x, mask = ragged_batch(lengths)
    y = torch.tensor([0, 1, 1])
    # No Gumbel noise so a bag's gradient can be recomputed alone and compared.
    monkeypatch.setattr(micromil_selection, "gumbel_noise", torch.zeros_like)
    logits = gsm(x, mask)
    F.cross_entropy(logits, y, reduction="sum").backward()
    for pname, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, pname
    # Per-bag gradients of the full loss (CE + KL) equal each bag's gradient alone,
    # so padding does not leak between bags.
    assert_per_bag_gradients(lambda: build_model("micromil", D, C, params), lengths, y)


@pytest.mark.parametrize("backend", ["pyg", "dense"])
def test_micromil_zero_attention_init_starts_uniform_and_learns(backend: str) -> None:
    params = {**SMALL_MICROMIL, "gnn_backend": backend, "gnn_att_init": "zero", "dropout": 0.0}
    model = make_model("micromil", params).train()
    att = {n: p for n, p in model.named_parameters() if ".att_" in n}
    assert len(att) == 2 * model.params.gnn_layers
    assert all(float(p.abs().sum()) == 0.0 for p in att.values())
    # The other weights are drawn exactly as with the glorot default (same RNG stream).
    glorot = make_model("micromil", {**params, "gnn_att_init": "glorot"})
    same = [n for n, _ in model.named_parameters() if ".att_" not in n]
    for n in same:
        torch.testing.assert_close(model.get_parameter(n), glorot.get_parameter(n))
    x, mask = ragged_batch([7, 5, 9])
    loss, _ = model.loss(x, mask, torch.tensor([0, 1, 1]))
    loss.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in att.values())  # attention can move


def test_micromil_att_init_is_validated() -> None:
    with pytest.raises(ConfigError, match="gnn_att_init"):
        make_model("micromil", {**SMALL_MICROMIL, "gnn_att_init": "xavier"})


def test_micromil_is_registered_class() -> None:
    assert isinstance(make_model("micromil", SMALL_MICROMIL), MicroMIL)


def test_load_model_code_imports_the_lazy_layers_and_keeps_the_random_state():
    # In a fresh process: what MicroMIL imports lazily (PyG, on the "pyg" backend) is loaded,
    # and the global RNG is where it was, so the seeded round 1 trains exactly as without
    # the warm-up. The default "dense" backend needs no PyG at all.
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from micromil_core.models.registry import load_model_code\n"
        "torch.manual_seed(3); before = torch.random.get_rng_state()\n"
        "assert 'torch_geometric.nn' not in sys.modules\n"
        "load_model_code('micromil', 16, 1)\n"  # one class at this site: built with 2
        "assert 'torch_geometric' not in sys.modules\n"
        "load_model_code('micromil', 16, 1, {'gnn_backend': 'pyg'})\n"
        "assert torch.equal(before, torch.random.get_rng_state())\n"
        "print('torch_geometric.nn' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
