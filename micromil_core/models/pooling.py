"""Mean- and max-pooling MIL baselines, and the masked primitives the other models share.

Both baselines embed every instance with a small MLP, pool over the real (unmasked)
instances of each bag and classify the pooled vector with a linear head. Padding never
reaches the output: pooled statistics only see positions where ``mask`` is True.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from micromil_core.errors import ConfigError
from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.registry import check_float, check_int, register_model


def check_batch(x: Tensor, mask: Tensor, in_dim: int) -> None:
    """Validate a dense padded batch before it reaches a model.

    Shapes: x (B, N, D) float, mask (B, N) bool; every bag needs at least one instance.
    """
    if x.dim() != 3:
        raise ConfigError(
            f"model input x has shape {tuple(x.shape)}; expected (B, N, D) -- "
            "batch bags with micromil_core.data.bag.collate_bags"
        )
    if x.shape[-1] != in_dim:
        raise ConfigError(
            f"model input feature dim {x.shape[-1]} != the model's in_dim {in_dim}; "
            "rebuild the model with in_dim matching the cached features"
        )
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ConfigError(
            f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}; expected a bool "
            f"tensor of shape {tuple(x.shape[:2])}"
        )
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ConfigError(
            f"bag(s) {empty.tolist()} of the batch have no instances; drop empty bags "
            "when building the dataset"
        )


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real instances of each bag.

    Shapes: h (B, N, H), mask (B, N) -> (B, H)
    """
    w = mask.to(h.dtype).unsqueeze(-1)  # (B, N, 1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, H)


def masked_max(h: Tensor, mask: Tensor) -> Tensor:
    """Element-wise max over the real instances of each bag.

    Shapes: h (B, N, H), mask (B, N) -> (B, H)
    """
    return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, H)


def mlp(in_dim: int, dims: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Instance embedding: ``Linear -> ReLU -> Dropout`` per entry of ``dims``.

    Shapes: (..., in_dim) -> (..., dims[-1]); identity when ``dims`` is empty.
    """
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = d
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class PoolingParams:
    """Hyper-parameters of ``mean-pool`` and ``max-pool``."""

    hidden_dim: int = 128  # width of the instance embedding
    dropout: float = 0.25

    def __post_init__(self) -> None:
        check_int("mean-pool/max-pool", "hidden_dim", self.hidden_dim, 1)
        check_float("mean-pool/max-pool", "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)


class _PoolingMIL(MILModel):
    """Shared body of the pooling baselines: instance MLP and linear head."""

    def __init__(self, in_dim: int, n_classes: int, params: PoolingParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        self.embed = mlp(in_dim, (params.hidden_dim,), params.dropout)
        self.head = nn.Linear(params.hidden_dim, n_classes)

    def pool(self, h: Tensor, mask: Tensor) -> Tensor:  # (B, N, H), (B, N) -> (B, H)
        raise NotImplementedError

    def instance_scores(self, h: Tensor, mask: Tensor, logits: Tensor) -> Tensor:
        """Shapes: h (B, N, H), mask (B, N), logits (B, C) -> (B, N), 0 where padded"""
        raise NotImplementedError

    def _pooled(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Shapes: x (B, N, D), mask (B, N) -> instance embeddings (B, N, H), pooled (B, H)"""
        check_batch(x, mask, self.in_dim)
        h = self.embed(x)  # (B, N, H)
        return h, self.pool(h, mask)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Bag logits.

        Shapes: x (B, N, D), mask (B, N) -> (B, C)
        """
        return self.head(self._pooled(x, mask)[1])  # (B, C)

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Logits, the pooled vector and each instance's share in the decision.

        The scores explain (and let MHIM's teacher rank instances); they carry no gradient.

        Shapes: x (B, N, D), mask (B, N) -> logits (B, C), bag (B, H), scores (B, N)
        """
        h, bag = self._pooled(x, mask)  # (B, N, H), (B, H)
        logits = self.head(bag)  # (B, C)
        with torch.no_grad():
            scores = self.instance_scores(h, mask, logits)  # (B, N)
        return Encoding(logits=logits, bag=bag, scores=scores)

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        return self.encode(x, mask).prediction()


@register_model("mean-pool", PoolingParams, "instance MLP, masked mean over instances, linear head")
class MeanPoolMIL(_PoolingMIL):
    """Mean pooling baseline.

    Instance scores are each instance's own logit for the predicted class: the head is
    linear, so the bag logit is exactly the mean of these instance logits.

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C)
    """

    def pool(self, h: Tensor, mask: Tensor) -> Tensor:
        return masked_mean(h, mask)  # (B, H)

    def instance_scores(self, h: Tensor, mask: Tensor, logits: Tensor) -> Tensor:
        inst = self.head(h)  # (B, N, C)
        pred = logits.argmax(dim=-1)  # (B,)
        score = inst.gather(-1, pred[:, None, None].expand(-1, inst.shape[1], 1))  # (B, N, 1)
        return score.squeeze(-1) * mask  # (B, N)


@register_model("max-pool", PoolingParams, "instance MLP, masked max over instances, linear head")
class MaxPoolMIL(_PoolingMIL):
    """Max pooling baseline.

    Instance scores are the share of embedding dimensions whose bag maximum the instance
    provides (sums to 1 over a bag's instances).

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C)
    """

    def pool(self, h: Tensor, mask: Tensor) -> Tensor:
        return masked_max(h, mask)  # (B, H)

    def instance_scores(self, h: Tensor, mask: Tensor, logits: Tensor) -> Tensor:
        winner = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(dim=1)  # (B, H)
        share = torch.zeros(mask.shape, dtype=h.dtype, device=h.device)  # (B, N)
        share.scatter_add_(1, winner, torch.ones_like(winner, dtype=h.dtype))
        return share / h.shape[-1]  # (B, N)
