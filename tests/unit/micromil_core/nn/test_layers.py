"""The reusable layers of micromil_core.nn: init, reset_parameters, repr, shapes, masking.

Tiny seeded tensors. The seeded-init tests pin the contract that keeps checkpoints and
seeded runs reproducible: a layer draws exactly what the plain torch construction it
replaced drew, in the same order.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from micromil_core.nn import (
    GAT,
    PPEG,
    AddBias,
    ClassWiseLinear,
    DenseGATConv,
    GatedAttention,
    TransLayer,
    nystrom_attention,
)

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "add-bias": lambda: AddBias(5),
    "dense-gat-conv": lambda: DenseGATConv(4, 6, dropout=0.1),
    "gat-dense": lambda: GAT(4, 6, 2, 0.1, "dense"),
    "gat-pyg": lambda: GAT(4, 6, 2, 0.1, "pyg"),
    "trans-layer": lambda: TransLayer(8, 2, dropout=0.1, landmarks=4),
    "ppeg": lambda: PPEG(3),
    "gated-attention": lambda: GatedAttention(6, 5, n_out=3),
    "class-wise-linear": lambda: ClassWiseLinear(3, 4),
}
# Layers whose __init__ draws exactly what reset_parameters() draws (PyG's GATConv does not).
SAME_DRAWS = sorted(set(LAYERS) - {"gat-pyg"})


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- reset_parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reset_parameters_redraws_zeroed_weights(name: str) -> None:
    layer = LAYERS[name]()
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)  # neither zero nor any init's value
    layer.reset_parameters()
    for key, value in weights(layer).items():
        assert not bool((value == 7.0).any()), key


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reset_parameters_is_deterministic_under_a_seed(name: str) -> None:
    layer = LAYERS[name]()
    torch.manual_seed(3)
    layer.reset_parameters()
    first = weights(layer)
    torch.manual_seed(3)
    layer.reset_parameters()
    assert_same(first, weights(layer))


@pytest.mark.parametrize("name", SAME_DRAWS)
def test_reset_parameters_restores_the_fresh_init(name: str) -> None:
    torch.manual_seed(5)
    fresh = weights(LAYERS[name]())
    layer = LAYERS[name]()
    torch.manual_seed(5)
    layer.reset_parameters()
    assert_same(fresh, weights(layer))


def test_gat_pyg_reset_parameters_redraws_every_layer() -> None:
    gat = GAT(4, 6, 2, 0.0, "pyg")
    before = weights(gat)
    gat.reset_parameters()
    after = weights(gat)
    assert all(not torch.equal(before[k], after[k]) for k in before if not k.endswith("bias"))


# --- seeded init equals the plain torch construction it replaced ---------------------------


def test_dense_gat_conv_init_matches_linear_then_glorot() -> None:
    torch.manual_seed(0)
    conv, after = DenseGATConv(4, 6), torch.rand(3)
    torch.manual_seed(0)
    lins = [nn.Linear(4, 6, bias=False), nn.Linear(6, 1, bias=False), nn.Linear(6, 1, bias=False)]
    for lin in lins:
        nn.init.xavier_uniform_(lin.weight)
    assert torch.equal(after, torch.rand(3))  # the same number of draws
    for lin, own in zip(lins, (conv.lin, conv.att_src, conv.att_dst), strict=True):
        assert torch.equal(lin.weight, own.weight)
    assert torch.equal(conv.bias.bias, torch.zeros(6))


def test_trans_layer_and_ppeg_init_match_plain_torch_layers() -> None:
    torch.manual_seed(1)
    layer, ppeg, after = TransLayer(8, 2), PPEG(8), torch.rand(2)
    torch.manual_seed(1)
    norm, qkv, out = nn.LayerNorm(8), nn.Linear(8, 24, bias=False), nn.Linear(8, 8)
    convs = [nn.Conv2d(8, 8, k, padding=k // 2, groups=8) for k in (7, 5, 3)]
    assert torch.equal(after, torch.rand(2))  # the same number of draws
    assert_same(weights(layer), {**_prefixed("norm", norm), **_prefixed("qkv", qkv), **_prefixed("out", out)})
    assert_same(weights(ppeg), {k: v for i, c in enumerate(convs) for k, v in _prefixed(f"convs.{i}", c).items()})


def test_gated_attention_and_class_wise_linear_init_match_plain_torch() -> None:
    torch.manual_seed(2)
    att, cw = GatedAttention(6, 5, 3), ClassWiseLinear(3, 4)
    torch.manual_seed(2)
    v, u, w = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)
    weight = torch.empty(3, 4).uniform_(-(4**-0.5), 4**-0.5)
    assert_same(weights(att), {**_prefixed("v", v), **_prefixed("u", u), **_prefixed("w", w)})
    assert torch.equal(cw.weight, weight) and torch.equal(cw.bias, torch.zeros(3))


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in weights(module).items()}


# --- repr ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "parts"),
    [
        (AddBias(5), ["5"]),
        (DenseGATConv(4, 6, dropout=0.1), ["4, 6, dropout=0.1, negative_slope=0.2"]),
        (GAT(4, 6, 2, 0.1, "dense"), ["4, hidden=6, n_layers=2", "backend='dense'"]),
        (TransLayer(8, 2, attention="exact"), ["8, n_heads=2", "attention='exact'", "landmarks=256"]),
        (PPEG(3), ["3, kernels=(7, 5, 3)"]),
        (GatedAttention(6, 5, 3), ["in_dim=6, attn_dim=5, n_out=3"]),
        (ClassWiseLinear(3, 4), ["n_classes=3, width=4"]),
    ],
)
def test_repr_names_the_dimensions(layer: nn.Module, parts: list[str]) -> None:
    text = repr(layer)  # print(model) shows these for every layer
    assert text.startswith(type(layer).__name__ + "(")
    for part in parts:
        assert part in layer.extra_repr() and part in text


# --- GAT -------------------------------------------------------------------------------------


def test_dense_gat_conv_shape_and_edges() -> None:
    torch.manual_seed(0)
    conv = DenseGATConv(4, 6).eval()
    x = torch.randn(2, 5, 4)  # (B, K, C_in)
    adj = torch.zeros(2, 5, 5)
    adj[:, 1, 0] = 1.0  # edge 1 -> 0 only
    out = conv(x, adj)
    assert out.shape == (2, 5, 6)
    # A node with no incoming edge attends only to itself (the self-loop).
    torch.testing.assert_close(out[:, 2], conv.lin(x[:, 2]) + conv.bias.bias)
    # Node 0 hears node 1 but not node 3: changing node 3 leaves node 0 as it was.
    x2 = x.clone()
    x2[:, 3] += 10.0
    torch.testing.assert_close(conv(x2, adj)[:, 0], out[:, 0])
    x2[:, 1] += 10.0
    assert not torch.allclose(conv(x2, adj)[:, 0], out[:, 0])


def test_gat_stack_shape_and_zero_attention_is_a_mean() -> None:
    torch.manual_seed(0)
    gat = GAT(4, 6, n_layers=1, dropout=0.0, backend="dense").eval()
    gat.zero_attention()
    x = torch.randn(1, 3, 4)
    adj = torch.ones(1, 3, 3)  # fully connected: every node averages all three
    out = gat(x, adj)
    assert out.shape == (1, 3, 6)
    conv = gat.convs[0]
    mean = conv.lin(x).mean(dim=1) + conv.bias.bias  # (1, 6)
    torch.testing.assert_close(out, mean[:, None].expand(1, 3, 6))


# --- Nystrom / self-attention ----------------------------------------------------------------


def test_nystrom_attention_shape_and_padding_is_ignored() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))  # (B, H, T, d)
    mask = torch.ones(1, 9, dtype=torch.bool)
    out, row0 = nystrom_attention(q, k, v, mask, 3, 6)
    assert out.shape == (1, 2, 9, 4) and row0.shape == (1, 2, 9)
    # The same bag with 4 padded tokens of garbage appended: real tokens unchanged.
    pad = [torch.cat([t, 100 * torch.randn(1, 2, 4, 4)], dim=2) for t in (q, k, v)]
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    out_p, row0_p = nystrom_attention(*pad, padded_mask, 3, 6)
    torch.testing.assert_close(out_p[:, :, :9], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row0_p[:, :, :9], row0, atol=1e-6, rtol=1e-5)
    assert float(row0_p[:, :, 9:].abs().max()) == 0.0


@pytest.mark.parametrize("attention", ["exact", "nystrom"])
def test_trans_layer_shape_and_padding_is_ignored(attention: str) -> None:
    torch.manual_seed(0)
    layer = TransLayer(8, 2, attention=attention, landmarks=3).eval()
    t = torch.randn(1, 7, 8)
    out, row0 = layer(t, torch.ones(1, 7, dtype=torch.bool))
    assert out.shape == (1, 7, 8) and row0.shape == (1, 2, 7)
    padded = torch.cat([t, 50 * torch.randn(1, 3, 8)], dim=1)
    mask = torch.cat([torch.ones(1, 7, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    out_p, row0_p = layer(padded, mask)
    torch.testing.assert_close(out_p[:, :7], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row0_p[:, :, :7], row0, atol=1e-6, rtol=1e-5)


def test_trans_layer_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="not divisible by n_heads=3"):
        TransLayer(8, 3)
    with pytest.raises(ValueError, match="attention='fast' is not one of exact, nystrom, auto"):
        TransLayer(8, 2, attention="fast")


# --- layering --------------------------------------------------------------------------------


def test_nn_never_imports_the_models() -> None:
    # micromil_core.models builds on micromil_core.nn; the reverse would be an import cycle.
    code = (
        "import sys, micromil_core.nn; "
        "print(any(m.startswith('micromil_core.models') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_building_and_training_micromil_imports_neither_pyg_nor_sympy() -> None:
    # Each costs seconds in every process that builds a model (a federation's pre-flight,
    # coordinator and site workers): the default dense GAT needs no PyG, and deferred()
    # allocates without the meta-tensor path that imports sympy.
    code = (
        "import sys, torch; from micromil_core.models import build_model; "
        "m = build_model('micromil', 8, 2, {'n_clusters': 4}).train(); "
        "x, mask = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool); "
        "m.loss(x, mask, torch.tensor([0, 1]))[0].backward(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch_geometric', 'sympy'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_deferred_allocates_on_the_default_device_without_drawing() -> None:
    from micromil_core.nn._deferred import deferred

    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    layer = deferred(nn.Linear, 3, 4)
    assert torch.equal(torch.random.get_rng_state(), before)  # nothing drawn
    assert layer.weight.device == torch.get_default_device() and layer.weight.shape == (4, 3)
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
    bn = deferred(nn.BatchNorm1d, 5)  # buffers too
    assert bn.running_mean.device.type != "meta" and "num_batches_tracked" in bn.state_dict()
