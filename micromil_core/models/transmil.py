"""TransMIL (Shao et al., NeurIPS 2021): a transformer over the instances of a bag.

Instances are reduced by ``Linear -> ReLU``, a learnable class token is prepended, and the
instance tokens are padded to the next square number by repeating the bag's own first
instances, so they fill a ``side x side`` grid. Two pre-norm self-attention layers follow,
with the PPEG block between them: depth-wise 7x7, 5x5 and 3x3 convolutions on that grid,
added to the grid tokens (a position encoding conditioned on the neighbours). The class
token, after a final LayerNorm, feeds the linear head.

Batching. Every bag gets its OWN square grid built from its own real instances: the grids
of a batch sit in the top-left corner of one zero canvas, so a convolution sees exactly the
zeros that its ``padding`` would add for the bag alone, and attention ignores padded tokens
through a key-padding mask. A bag therefore gives the same output alone and in any padded
batch, and the mask may have holes (MHIM drops instances): the real instances are taken in
bag order wherever they sit. Every parameter-owning layer is called once per forward on one
tensor (the class token is an ``nn.Embedding`` looked up at index 0), so Opacus can compute
per-bag gradients.

Attention (param ``attention``). ``exact`` is masked softmax attention, whose (T x T)
matrix per head costs O(T^2) memory: fine for the tens to a few thousand instances of most
bags here, out of memory for whole-slide bags of 10^4 - 10^5 patches (T = 10^4 already
needs 3.2 GB per matrix at 8 heads). ``nystrom`` is the paper's Nystrom attention
(Xiong et al., AAAI 2021, "Nystromformer"), O(T m) for m landmarks:

    F = softmax(Q K_l^T)  (T x m)     A = softmax(Q_l K_l^T)  (m x m)
    B = softmax(Q_l K^T)  (m x T, padded keys masked)     out = F pinv(A) (B V)

Q_l, K_l are the means of m contiguous segments of each bag's REAL tokens, and pinv is
the iterative Moore-Penrose pseudo-inverse (Razavi et al. 2014), scaled per bag and head.
Nothing of one bag (landmarks, masks, the pinv's starting scale) depends on its batch, so
the padding invariance above holds for Nystrom too, up to float rounding. ``auto`` (the
default) chooses per bag: exact while the bag's token count (class token + its square
grid) is at most ``nystrom_threshold``, Nystrom above it; so existing configs behave as
before on small bags and do not run out of memory on large ones (a checkpoint saved before
these params existed loads as ``auto``: set ``attention: exact`` to evaluate it exactly on
bags above the threshold). In every mode a bag with
at most ``landmarks`` tokens uses exact attention: with m >= T Nystrom is exact only up to
the pinv's convergence and costs more (O(m^3)) than the (T x T) matrix it replaces.

Unlike the Nystrom code the TransMIL authors used, there is no depth-wise convolution
residual on V (kernel 33 along the token sequence): ``auto`` switches between exact and
Nystrom attention inside one model, so both must compute the same function with the same
parameters (a conv only Nystrom used would be untrained on small bags, and would break
loading of existing checkpoints); the PPEG already gives each token its neighbourhood.
Nystrom has no attention dropout (only the output dropout): the weights it would drop are
not materialised.

The class token's attention to the instances (instance scores: MHIM's masking, ``evaluate
--explain``) is row 0 of the attention: exact, or ``F[0] pinv(A) B`` in O(m T) for Nystrom,
clipped at 0 since the approximation may dip slightly below it.

The layers live in :mod:`micromil_core.nn` (``TransLayer``, ``PPEG``, ``nystrom``); this
module holds the model: its params, the square layout and the class token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from micromil_core.errors import ConfigError
from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.pooling import check_batch
from micromil_core.models.registry import check_choice, check_float, check_int, register_model
from micromil_core.nn import ATTENTION_MODES, PPEG, TransLayer

# Old import path of the Nystrom functions (tests import them from here).


@dataclass(frozen=True)
class TransMILParams:
    """Hyper-parameters of ``transmil``.

    The paper reduces 1024-d ResNet-50 features to 512; 256 is a saner width for the
    166- to 1024-d features used here (fewer parameters than bags' worth of data would
    support at 512), and keeps 8 heads of 32 dims. Dropout acts on the reduced instance
    features, the attention outputs and the exact attention weights (the authors' code
    uses 0.1 in attention).

    Attention (see the module docstring): ``attention`` is ``exact``, ``nystrom`` or
    ``auto`` (exact for bags of at most ``nystrom_threshold`` tokens, Nystrom above).
    ``nystrom_threshold`` = 2048 tokens keeps exact attention (the reference, not an
    approximation) while its (T x T) matrices cost at most 2048^2 x 8 heads x 4 B = 134 MB
    each per bag and layer (about 1 GB of training memory per bag at dim 256, measured);
    on CPU Nystrom is already faster from about 1000 tokens, so lower the threshold where
    speed matters more than exactness. ``landmarks`` = 256 is the paper's count
    (num_landmarks = dim // 2 at its dim 512), kept at our dim 256: the landmarks summarise
    a bag's tokens, so how many are needed depends on the bag, not on the width; more
    would raise the O(T m) memory that Nystrom exists to save. ``pinv_iterations`` = 6 is
    Nystromformer's (Xiong et al. 2021) and TransMIL's; it leaves the pseudo-inverse
    approximate (on a random 12 x 12 softmax kernel about 3e-2 off in the output, 1e-5 at
    20 iterations): raise it where Nystrom must track exact attention more closely.
    """

    dim: int = 256
    n_heads: int = 8
    dropout: float = 0.1
    attention: str = "auto"
    nystrom_threshold: int = 2048
    landmarks: int = 256
    pinv_iterations: int = 6

    def __post_init__(self) -> None:
        check_int("transmil", "dim", self.dim, 1)
        check_int("transmil", "n_heads", self.n_heads, 1)
        check_float("transmil", "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check_choice("transmil", "attention", self.attention, ATTENTION_MODES)
        check_int("transmil", "nystrom_threshold", self.nystrom_threshold, 1)
        check_int("transmil", "landmarks", self.landmarks, 1)
        check_int("transmil", "pinv_iterations", self.pinv_iterations, 1)
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model 'transmil': param dim={self.dim} is not divisible by "
                f"n_heads={self.n_heads}; choose dim as a multiple of n_heads"
            )


@dataclass
class SquareLayout:
    """Where each bag's tokens come from and where they sit on the PPEG canvas.

    Token ``p`` of bag ``b`` is real instance ``p mod n_b`` (in bag order) and sits at cell
    ``(p // side_b, p % side_b)`` of a ``size x size`` canvas, ``size = max side_b``.

    Shapes:
        source: (B, S) instance index (into N) of each token, S = max side_b ** 2
        valid: (B, S) True for the side_b ** 2 tokens of bag b
        cell: (B, S) flat canvas cell of each token (0 where not valid)
        cell_token: (B, size * size) token index of each canvas cell (0 where not valid)
        cell_valid: (B, size * size) True inside bag b's side_b x side_b corner
    """

    source: Tensor
    valid: Tensor
    cell: Tensor
    cell_token: Tensor
    cell_valid: Tensor
    size: int


def square_layout(mask: Tensor) -> SquareLayout:
    """Per-bag square padding by repetition of the bag's first instances (Shao et al.).

    Shapes: mask (B, N) bool, at least one True per row -> SquareLayout (see its docstring)
    """
    n = mask.sum(dim=1)  # (B,)
    side = torch.sqrt(n.double()).floor().long()  # (B,)
    side = side + (side * side < n).long()  # ceil(sqrt(n)) without float rounding traps
    size = int(side.max())
    # Real instances first, in bag order, wherever the mask put them.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, N)
    p = torch.arange(size * size, device=mask.device)[None, :]  # (1, S)
    source = order.gather(1, p % n[:, None])  # (B, S); p >= n wraps to the first instances
    valid = p < (side * side)[:, None]  # (B, S)
    cell = torch.where(valid, (p // side[:, None]) * size + p % side[:, None], 0)  # (B, S)
    row, col = p // size, p % size  # (1, S) each: canvas coordinates
    cell_valid = (row < side[:, None]) & (col < side[:, None])  # (B, S)
    cell_token = torch.where(cell_valid, row * side[:, None] + col, 0)  # (B, S)
    return SquareLayout(source, valid, cell, cell_token, cell_valid, size)


def gather_rows(h: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of each bag.

    Shapes: h (B, N, L), index (B, M) -> (B, M, L)
    """
    return h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def _trans_layer(dim: int, params: TransMILParams) -> TransLayer:
    return TransLayer(
        dim,
        params.n_heads,
        dropout=params.dropout,
        attention=params.attention,
        nystrom_threshold=params.nystrom_threshold,
        landmarks=params.landmarks,
        pinv_iterations=params.pinv_iterations,
    )


@register_model(
    "transmil",
    TransMILParams,
    "TransMIL (Shao et al. 2021): class token, 2 self-attention layers, PPEG on a square grid",
)
class TransMIL(MILModel):
    """TransMIL; ``predict`` returns the last layer's class-token attention per instance.

    Instance score = the class token's attention to the instance's tokens (a repeated
    instance collects the attention of each of its copies), averaged over heads, clipped at
    0 (Nystrom's row is approximate) and renormalised over the bag's instances; 0 at padding.

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C); scores (B, N); bag embedding (B, L).
    """

    def __init__(self, in_dim: int, n_classes: int, params: TransMILParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        dim = params.dim
        self.reduce = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(params.dropout))
        # A learnable vector, stored as a 1-row embedding so Opacus handles it natively.
        self.cls_token = nn.Embedding(1, dim)
        self.layer1 = _trans_layer(dim, params)
        self.ppeg = PPEG(dim)
        self.layer2 = _trans_layer(dim, params)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def _positional(self, tokens: Tensor, layout: SquareLayout) -> Tensor:
        """PPEG on each bag's own grid, all bags on one zero canvas.

        Shapes: tokens (B, S, L) -> (B, S, L)
        """
        b, _, dim = tokens.shape
        canvas = gather_rows(tokens, layout.cell_token) * layout.cell_valid.unsqueeze(-1)
        grid = canvas.transpose(1, 2).reshape(b, dim, layout.size, layout.size)  # (B, L, K, K)
        # contiguous(): Opacus's conv per-sample gradient is wrong on channels-last strides.
        grid = grid.contiguous()
        out = self.ppeg(grid).flatten(2).transpose(1, 2)  # (B, K*K, L)
        return gather_rows(out, layout.cell)  # (B, S, L)

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Shapes: x (B, N, D), mask (B, N) -> logits (B, C), bag (B, L), scores (B, N)"""
        check_batch(x, mask, self.in_dim)
        h = self.reduce(x)  # (B, N, L)
        layout = square_layout(mask)
        tokens = gather_rows(h, layout.source)  # (B, S, L)
        index = torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device)  # (B, 1)
        t = torch.cat([self.cls_token(index), tokens], dim=1)  # (B, 1+S, L)
        key_mask = torch.cat([torch.ones_like(index, dtype=torch.bool), layout.valid], dim=1)
        t, _ = self.layer1(t, key_mask)  # (B, 1+S, L)
        t = torch.cat([t[:, :1], self._positional(t[:, 1:], layout)], dim=1)  # (B, 1+S, L)
        t, row0 = self.layer2(t, key_mask)  # (B, 1+S, L), (B, H, 1+S)
        bag = self.norm(t[:, 0])  # (B, L): LayerNorm is per token, only the class token is read
        # Class token -> instance tokens; clipped since Nystrom's row may dip below 0.
        cls_attn = row0[:, :, 1:].mean(dim=1).clamp_min(0.0)  # (B, S)
        scores = torch.zeros(mask.shape, dtype=cls_attn.dtype, device=cls_attn.device)  # (B, N)
        scores = scores.scatter_add(1, layout.source, cls_attn * layout.valid)  # (B, N)
        scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, N)
        return Encoding(logits=self.head(bag), bag=bag, scores=scores)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Shapes: x (B, N, D), mask (B, N) -> (B, C)"""
        return self.encode(x, mask).logits

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        return self.encode(x, mask).prediction()
