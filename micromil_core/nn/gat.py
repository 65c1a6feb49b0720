"""Graph attention (GAT, Velickovic et al. 2018) over small dense graphs, two backends.

MicroMIL builds one graph of K nodes per bag as a dense adjacency ``(B, K, K)``.

* ``"pyg"``: ``torch_geometric.nn.GATConv`` on the batched sparse graph (bags become
  disconnected components of one big graph).
* ``"dense"``: :class:`DenseGATConv`, the same maths on the dense adjacency. Every
  parameter-owning submodule takes ONE tensor (``nn.Linear``, :class:`AddBias`) and the
  masking / softmax / aggregation is parameter-free code, so Opacus computes per-bag
  (per-patient) gradients. PyG's GATConv does not work under Opacus 1.6: it owns raw
  parameters (att_src, att_dst, bias), so Opacus takes its functorch path, which calls the
  module with only its first input and fails with "missing 1 required positional argument:
  'edge_index'"; and its sparse batch would make the node, not the bag, the privacy unit.

Adjacency convention (as ``torch_geometric.utils.dense_to_sparse``): ``adj[b, i, j] = 1``
is an edge from source ``i`` to target ``j``. Both backends add self-loops, like GATConv.
:func:`convert_gat_state` maps weights between the backends; with equal weights they give
the same output in eval mode (tested to 1e-5).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micromil_core.errors import ConfigError
from micromil_core.nn._deferred import deferred
from micromil_core.nn.functional import masked_softmax

GNN_BACKENDS = ("pyg", "dense")
GAT_ATT_INITS = ("glorot", "zero")


class AddBias(nn.Module):
    """``x + bias``: a bias owned by a one-input module, so Opacus can per-sample it.

    Shapes: (..., C) -> (..., C)
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}"

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class DenseGATConv(nn.Module):
    """Single-head GAT layer on a dense batched adjacency; numerically matches ``GATConv``.

    ``alpha[i, j] = softmax_j(LeakyReLU(a_dst . W x_i + a_src . W x_j))`` over the sources
    ``j`` with an edge ``j -> i`` (self-loop always included), ``out_i = sum_j alpha W x_j + b``.

    Shapes: x (B, K, C_in), adj (B, K, K) -> (B, K, C_out)
    """

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, negative_slope: float = 0.2
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.negative_slope = dropout, negative_slope
        self.lin = deferred(nn.Linear, in_channels, out_channels, bias=False)
        self.att_src = deferred(nn.Linear, out_channels, 1, bias=False)
        self.att_dst = deferred(nn.Linear, out_channels, 1, bias=False)
        self.bias = AddBias(out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot weights and a zero bias, as PyG's GATConv.

        nn.Linear's own init runs first although glorot overwrites it: its random draws
        keep a seed's weights identical to those of the layer's earlier versions.
        """
        layers = (self.lin, self.att_src, self.att_dst)
        for lin in layers:
            lin.reset_parameters()
        self.bias.reset_parameters()
        for lin in layers:
            nn.init.xavier_uniform_(lin.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, dropout={self.dropout}, "
            f"negative_slope={self.negative_slope}"
        )

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        k = adj.shape[-1]
        h = self.lin(x)  # (B, K, C)
        a_src = self.att_src(h).squeeze(-1)  # (B, K)
        a_dst = self.att_dst(h).squeeze(-1)  # (B, K)
        logits = F.leaky_relu(a_dst[:, :, None] + a_src[:, None, :], self.negative_slope)
        # Row i lists the sources of target i, hence the transpose; self-loops as in GATConv.
        eye = torch.eye(k, dtype=torch.bool, device=adj.device)
        edges = (adj.transpose(1, 2) > 0) | eye  # (B, K_dst, K_src)
        alpha = masked_softmax(logits, edges, dim=-1)  # (B, K_dst, K_src)
        if self.training and self.dropout > 0:
            alpha = alpha * pyg_order_dropout_mask(adj, self.dropout, alpha.dtype)
        return self.bias(alpha @ h)  # (B, K, C)


def pyg_order_dropout_mask(adj: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """Attention-dropout mask drawn as PyG's GATConv draws it, laid out densely.

    GATConv drops an (E, 1) tensor of coefficients whose rows are the edges in
    ``dense_to_sparse``'s order (row-major over bag, source, target) without self-loops,
    then one self-loop per node. Dropping a tensor of ones of that shape consumes the
    random stream as GATConv does, so a seed trains the same under either backend.

    Shapes: adj (B, K, K) -> (B, K_dst, K_src): 1/(1-p) where kept, 0 where dropped or no edge
    """
    b, k, _ = adj.shape
    eye = torch.eye(k, dtype=torch.bool, device=adj.device)
    off_diagonal = (adj != 0) & ~eye  # (B, K_src, K_dst)
    n_off = int(off_diagonal.sum())
    ones = torch.ones(n_off + b * k, 1, dtype=dtype, device=adj.device)
    kept = F.dropout(ones, p, training=True).view(-1)  # (E,)
    mask = torch.zeros(b, k, k, dtype=dtype, device=adj.device)
    mask[off_diagonal] = kept[:n_off]  # boolean indexing runs row-major, as dense_to_sparse
    mask.diagonal(dim1=1, dim2=2).copy_(kept[n_off:].view(b, k))
    return mask.transpose(1, 2)


def _pyg_gatconv(in_channels: int, out_channels: int, dropout: float) -> nn.Module:
    from torch_geometric.nn import GATConv  # imported lazily: heavy, unused by "dense"

    conv = GATConv(in_channels, out_channels, heads=1, dropout=dropout, add_self_loops=True)
    _remove_pyg_template_files()
    return conv


def _remove_pyg_template_files() -> None:
    """Delete the source files PyG renders into the temp folder for its compiled propagate.

    PyG writes one ``*_propagate_*.py`` per process and never removes it. A hospital's
    SuperNode starts a fresh process for every Flower message, so without this the temp
    folder gains a file per message for as long as the site runs. The module is already
    imported; only its source text (used by tracebacks) goes.
    """
    tmp = Path(tempfile.gettempdir()).resolve()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not (name.startswith("torch_geometric.") and path and name.endswith(("_propagate", "_edge_updater"))):
            continue
        file = Path(path)
        if file.parent.resolve() == tmp and file.is_file():
            file.unlink(missing_ok=True)


class GAT(nn.Module):
    """A stack of single-head GAT layers with LeakyReLU between layers.

    Feature dropout precedes every layer and the same rate drops attention coefficients
    (as in Velickovic et al. 2018). No activation after the last layer: the caller reads
    the node embeddings out.

    Shapes: x (B, K, C_in), adj (B, K, K) -> (B, K, hidden)
    """

    def __init__(
        self, in_channels: int, hidden: int, n_layers: int, dropout: float, backend: str
    ) -> None:
        super().__init__()
        if backend not in GNN_BACKENDS:
            raise ConfigError(f"gnn_backend {backend!r} is not one of {', '.join(GNN_BACKENDS)}")
        self.backend, self.dropout = backend, dropout
        self.in_channels, self.hidden, self.n_layers = in_channels, hidden, n_layers
        make = _pyg_gatconv if backend == "pyg" else DenseGATConv
        # Each layer initialises itself; __init__ does not call reset_parameters() again
        # because PyG's GATConv draws its init in a different order from its own
        # reset_parameters(), so a second pass would change every seeded "pyg" model.
        self.convs = nn.ModuleList(
            make(in_channels if i == 0 else hidden, hidden, dropout) for i in range(n_layers)
        )

    def reset_parameters(self) -> None:
        """Re-initialise every layer (glorot weights, zero bias, both backends)."""
        for conv in self.convs:
            conv.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, hidden={self.hidden}, n_layers={self.n_layers}, "
            f"dropout={self.dropout}, backend={self.backend!r}"
        )

    @torch.no_grad()
    def zero_attention(self) -> None:
        """Zero every layer's attention vectors (``att_src`` / ``att_dst``, both backends):
        each node then starts by averaging its neighbours, as a mean-aggregation GNN."""
        for conv in self.convs:
            for name, param in conv.named_parameters():
                if name.startswith(("att_src", "att_dst")):
                    param.zero_()

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        b, k, _ = x.shape
        edge_index = None
        if self.backend == "pyg":
            from torch_geometric.utils import dense_to_sparse

            edge_index = dense_to_sparse(adj)[0]  # (2, E), node ids offset per bag
        for i, conv in enumerate(self.convs):
            if i > 0:
                x = F.leaky_relu(x)
            x = F.dropout(x, self.dropout, self.training)
            if edge_index is None:
                x = conv(x, adj)  # (B, K, H)
            else:
                x = conv(x.reshape(b * k, -1), edge_index).view(b, k, -1)  # (B, K, H)
        return x


def convert_gat_state(state: Mapping[str, Tensor], backend: str) -> dict[str, Tensor]:
    """Rewrite the GAT layer weights in a state dict for ``backend`` ("pyg" or "dense").

    Works on any state dict that contains GAT layers (e.g. a whole MicroMIL model): layers
    are found by their attention keys, everything else passes through unchanged, and layers
    already in the target format are left alone.

    Mapping per layer ``p`` (C = out channels):
        pyg ``p.att_src`` (1, 1, C)  <->  dense ``p.att_src.weight`` (1, C); same for att_dst
        pyg ``p.bias`` (C)           <->  dense ``p.bias.bias`` (C)
        ``p.lin.weight`` (C, C_in) is shared.
    """
    if backend not in GNN_BACKENDS:
        raise ConfigError(f"gnn_backend {backend!r} is not one of {', '.join(GNN_BACKENDS)}")
    out = dict(state)
    if backend == "dense":
        prefixes = [k[: -len(".att_src")] for k in state if k.endswith(".att_src")]
        for p in prefixes:
            for att in ("att_src", "att_dst"):
                out[f"{p}.{att}.weight"] = out.pop(f"{p}.{att}").reshape(1, -1)
            out[f"{p}.bias.bias"] = out.pop(f"{p}.bias")
    else:
        prefixes = [k[: -len(".att_src.weight")] for k in state if k.endswith(".att_src.weight")]
        for p in prefixes:
            for att in ("att_src", "att_dst"):
                out[f"{p}.{att}"] = out.pop(f"{p}.{att}.weight").reshape(1, 1, -1)
            out[f"{p}.bias"] = out.pop(f"{p}.bias.bias")
    return out
