"""DSMIL (Li, Li & Eliceiri, CVPR 2021): dual-stream MIL with a critical instance per class.

Stream 1, max pooling: an instance classifier scores every instance for every class; the
highest-scoring real instance of class c is its critical instance, and the max over the
bag is the stream's bag logit. Stream 2, attention: every instance's query is compared by
scaled dot product with the critical instance's query, a softmax over the bag turns that
into attention, and the attention-weighted sum of value embeddings is the bag embedding of
class c. A bag classifier reads the C class embeddings. The loss weights the two streams'
cross-entropies 0.5/0.5 (Li et al.), and a prediction mixes the two streams' class
probabilities with the same weights, as the released code does at test time.

Choices (documented where paper and released code differ):
- Query and value are linear maps of the instance embedding (paper eq. 2); the dot product
  is scaled by 1/sqrt(q_dim) as in the released code, which keeps the softmax from
  saturating early in training.
- The paper's bag classifier is a Conv1d over the C class embeddings with kernel size = the
  embedding width; that is exactly a Linear on the flattened (C * W) embedding, used here.
- Li et al. feed self-supervised patch embeddings straight to both streams; here an optional
  instance MLP (``embed_dims``) adapts generic features first, ``()`` is the paper's setup.
- Padding is never a critical instance (masked argmax) and gets no attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.pooling import check_batch, masked_max, mlp
from micromil_core.models.registry import check_float, check_int, register_model
from micromil_core.nn import masked_softmax


@dataclass(frozen=True)
class DSMILParams:
    """Hyper-parameters of ``dsmil``.

    q_dim 128 is Li et al.'s query size. Dropout acts on the input of the value stream
    (Li et al.'s ``dropout_v``). bag_weight is the bag stream's share of the loss (0.5 in
    Li et al.; the max-instance stream gets the rest).
    """

    embed_dims: tuple[int, ...] = (128,)  # instance MLP widths; () = raw features
    q_dim: int = 128
    dropout: float = 0.25
    bag_weight: float = 0.5

    def __post_init__(self) -> None:
        for d in self.embed_dims:
            check_int("dsmil", "embed_dims", d, 1)
        check_int("dsmil", "q_dim", self.q_dim, 1)
        check_float("dsmil", "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check_float("dsmil", "bag_weight", self.bag_weight, 0.0, 1.0)


@dataclass
class DSMILOutput:
    """Both streams of DSMIL on a batch.

    Shapes:
        logits: (B, C) bag-classifier logits (what ``forward`` returns)
        max_logits: (B, C) max over real instances of the instance logits
        bag: (B, C * W) the C class embeddings, flattened
        attention: (B, N, C) attention of each instance for each class, 0 at padding
        critical: (B, C) index of each class's critical instance
    """

    logits: Tensor
    max_logits: Tensor
    bag: Tensor
    attention: Tensor
    critical: Tensor


@register_model(
    "dsmil",
    DSMILParams,
    "DSMIL (Li et al. 2021): max-instance stream + attention to the critical instance",
)
class DSMIL(MILModel):
    """Dual-stream MIL; ``predict`` returns the attention for the predicted class.

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C); attention (B, N), 0 at padding.
    """

    head_modules = ("bag_head", "instance_head")  # predict averages both streams' classifiers

    def __init__(self, in_dim: int, n_classes: int, params: DSMILParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        # No dropout here: Li et al. drop only the value stream's input.
        self.embed = mlp(in_dim, params.embed_dims, 0.0)
        width = params.embed_dims[-1] if params.embed_dims else in_dim
        self.instance_head = nn.Linear(width, n_classes)
        self.query = nn.Linear(width, params.q_dim)
        self.value = nn.Sequential(nn.Dropout(params.dropout), nn.Linear(width, width))
        self.bag_head = nn.Linear(n_classes * width, n_classes)

    def run(self, x: Tensor, mask: Tensor) -> DSMILOutput:
        """Both streams (see ``DSMILOutput`` for shapes)."""
        check_batch(x, mask, self.in_dim)
        h = self.embed(x)  # (B, N, W)
        inst = self.instance_head(h)  # (B, N, C)
        q = self.query(h)  # (B, N, Q)
        v = self.value(h)  # (B, N, W)
        critical = inst.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(dim=1)  # (B, C)
        q_crit = q.gather(1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Q)
        sim = torch.einsum("bnq,bcq->bnc", q, q_crit) * q.shape[-1] ** -0.5  # (B, N, C)
        attention = masked_softmax(sim, mask.unsqueeze(-1), dim=1)  # (B, N, C)
        bag = torch.einsum("bnc,bnw->bcw", attention, v).flatten(1)  # (B, C * W)
        return DSMILOutput(
            logits=self.bag_head(bag),
            max_logits=masked_max(inst, mask),
            bag=bag,
            attention=attention,
            critical=critical,
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Bag-stream logits. Shapes: x (B, N, D), mask (B, N) -> (B, C)"""
        return self.run(x, mask).logits


    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Shapes: x (B, N, D), mask (B, N) -> logits (B, C), bag (B, C*W), scores (B, N)"""
        return _encoding(self.run(x, mask))

    def encode_loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Encoding, Tensor, dict[str, float]]:
        """``bag_weight * CE(bag logits) + (1 - bag_weight) * CE(max instance logits)``, with
        the encoding behind it. parts: ``ce`` (bag stream), ``max_ce`` (max-instance stream)."""
        out = self.run(x, mask)
        ce = F.cross_entropy(out.logits, target, weight=class_weight)
        max_ce = F.cross_entropy(out.max_logits, target, weight=class_weight)
        w = self.params.bag_weight
        loss = w * ce + (1.0 - w) * max_ce
        return _encoding(out), loss, {"ce": float(ce.detach()), "max_ce": float(max_ce.detach())}

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        """Probabilities: ``bag_weight`` x bag stream + the rest x max-instance stream."""
        out = self.run(x, mask)
        w = self.params.bag_weight
        probs = w * torch.softmax(out.logits, dim=-1) + (1.0 - w) * torch.softmax(out.max_logits, dim=-1)
        return Prediction(
            probs=probs,
            instance_scores=_predicted_class_attention(out),
            extras={"critical": out.critical, "max_logits": out.max_logits},
        )


def _encoding(out: DSMILOutput) -> Encoding:
    return Encoding(out.logits, out.bag, _predicted_class_attention(out))


def _predicted_class_attention(out: DSMILOutput) -> Tensor:
    """Each instance's attention for the bag's predicted class.

    Shapes: out.attention (B, N, C), out.logits (B, C) -> (B, N)
    """
    pred = out.logits.argmax(dim=-1)  # (B,)
    index = pred[:, None, None].expand(-1, out.attention.shape[1], 1)  # (B, N, 1)
    return out.attention.gather(2, index).squeeze(-1)  # (B, N)
