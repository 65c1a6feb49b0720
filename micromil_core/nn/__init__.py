"""Reusable neural-network layers of the MIL models, apart from the models themselves.

Every layer owns its parameters, re-draws them with ``reset_parameters()`` (which its
``__init__`` calls, except containers whose sublayers initialise themselves: :class:`GAT`)
and describes its dimensions in ``repr``. Parameter-owning sublayers take one tensor and
masking happens in parameter-free code, so Opacus can compute per-bag gradients. This
package never imports :mod:`micromil_core.models`.
"""

from micromil_core.nn.attention_pooling import ClassWiseLinear, GatedAttention
from micromil_core.nn.functional import masked_softmax
from micromil_core.nn.gat import (
    GAT,
    GAT_ATT_INITS,
    GNN_BACKENDS,
    AddBias,
    DenseGATConv,
    convert_gat_state,
)
from micromil_core.nn.nystrom import iterative_pinv, nystrom_attention, segment_weights
from micromil_core.nn.ppeg import PPEG
from micromil_core.nn.self_attention import ATTENTION_MODES, TransLayer

__all__ = [
    "ATTENTION_MODES",
    "GAT",
    "GAT_ATT_INITS",
    "GNN_BACKENDS",
    "PPEG",
    "AddBias",
    "ClassWiseLinear",
    "DenseGATConv",
    "GatedAttention",
    "TransLayer",
    "convert_gat_state",
    "iterative_pinv",
    "masked_softmax",
    "nystrom_attention",
    "segment_weights",
]
