"""CLAM-SB (Lu et al., Nature Biomedical Engineering 2021): single-branch CLAM.

A fully connected layer embeds each instance, gated attention (one branch) weights the
instances, and a linear head classifies the weighted sum, as in gated ABMIL. CLAM adds
instance-level clustering: in each bag the k most and k least attended instances are
pseudo-labelled for the bag's TRUE class, top-k as in-class (1) and bottom-k as
out-of-class (0), and an instance classifier of that class is trained on them. The loss is
``bag_weight * CE_bag + (1 - bag_weight) * instance loss`` with bag_weight 0.7 (Lu et al.).

Choices:
- k = min(k_sample, floor(n / 2)) per bag, so the two sets never share an instance and tiny
  bags still work; a one-instance bag has k = 0 and adds nothing to the instance loss.
  The instance loss is the mean over the bag's 2k selected instances, averaged over ALL
  bags of the batch (a k = 0 bag counts 0), so one bag's loss never depends on another's.
- The instance loss is ``instance_loss = "svm"`` (default) or ``"ce"``. "svm" is the smooth
  top-1 SVM of Berrada, Zisserman & Kumar (ICLR 2018) with tau = alpha = 1, Lu et al.'s
  default; "ce" is cross-entropy. With two pseudo-classes the SVM is
  ``tau * softplus((alpha + s_other - s_target) / tau)``, so at tau = 1 it is
  cross-entropy with a margin alpha: its pull at a score margin m equals cross-entropy's
  at m - alpha, so it keeps pushing until the pseudo-label wins by more than alpha. Both
  are computed per instance, so the per-bag reduction above is unchanged and the loss
  stays parameter-free. Berrada et al.'s code switches to the exact hinge when the top
  score leads by more than tau * log(1000); the log-sum-exp here is stable at any scale,
  so one formula serves (there the two differ by < 0.003 for tau = alpha = 1, C = 2).
- ``subtyping: true`` (Lu et al.'s option for tasks of several disease subtypes) adds
  the out-of-class term: the bag's top-k instances are also shown to every OTHER
  class's classifier with pseudo-label 0, since the evidence for one subtype is
  evidence against the rest. The bag's instance loss is then the in-class term plus the
  C - 1 out-of-class terms, divided by C, as in Lu et al. Off by default, as Lu et al.
  have it for tumour-vs-normal tasks: normal tissue also appears in tumour bags, so there
  the classes do not exclude each other instance by instance.
- The C per-class instance classifiers (each Linear(L, 2)) are one Linear(L, 2C) whose
  rows for the bag's true class are picked afterwards: the same maps, one layer call, so
  Opacus can compute per-bag gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.pooling import check_batch
from micromil_core.models.registry import check_choice, check_float, check_int, register_model
from micromil_core.nn import masked_softmax

INSTANCE_LOSSES = ("svm", "ce")


@dataclass(frozen=True)
class CLAMParams:
    """Hyper-parameters of ``clam-sb``.

    CLAM's 'small' network maps 1024-d features to 512 with attention dim 256; 256/128 is
    the same 2:1 shape scaled to the 166- to 1024-d features used here. Dropout 0.25,
    k_sample 8 and bag_weight 0.7 are Lu et al.'s defaults.

    instance_loss "svm" with svm_tau = svm_alpha = 1 is Lu et al.'s default instance loss
    (``SmoothTop1SVM(n_classes=2)``, Berrada et al.'s defaults); "ce" is cross-entropy.
    It is the default here because it is Lu et al.'s, not because it won: 10-fold CV on
    MUSK1 (configs/cv/clam-sb.yaml, seed 0, one repeat) gave mean AUC 0.927 (svm) vs 0.922
    (ce), accuracy 0.857 both, with fold std 0.06 to 0.10, i.e. within noise.
    svm_tau >= 1e-3 because below that the loss is the hinge in all but name and its
    gradient is a sparse subgradient. svm_alpha = 0 is allowed: with tau = 1 and two
    pseudo-classes it is then exactly cross-entropy.

    subtyping adds the out-of-class term of Lu et al. for subtype tasks (module docstring).
    """

    embed_dim: int = 256
    attn_dim: int = 128
    dropout: float = 0.25
    k_sample: int = 8
    bag_weight: float = 0.7
    instance_loss: str = "svm"
    svm_tau: float = 1.0
    svm_alpha: float = 1.0
    subtyping: bool = False

    def __post_init__(self) -> None:
        check_int("clam-sb", "embed_dim", self.embed_dim, 1)
        check_int("clam-sb", "attn_dim", self.attn_dim, 1)
        check_float("clam-sb", "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check_int("clam-sb", "k_sample", self.k_sample, 1)
        check_float("clam-sb", "bag_weight", self.bag_weight, 0.0, 1.0)
        check_choice("clam-sb", "instance_loss", self.instance_loss, INSTANCE_LOSSES)
        check_float("clam-sb", "svm_tau", self.svm_tau, 1e-3, math.inf)
        check_float("clam-sb", "svm_alpha", self.svm_alpha, 0.0, math.inf)


def smooth_top1_svm(logits: Tensor, target: Tensor, tau: float = 1.0, alpha: float = 1.0) -> Tensor:
    """Smooth top-1 multi-class SVM loss of each row (Berrada et al., ICLR 2018), unreduced.

    ``tau * log sum_j exp((alpha * [j != y] + s_j - s_y) / tau)``: the hinge
    ``max_j(alpha * [j != y] + s_j) - s_y`` with its max replaced by a log-sum-exp of
    temperature tau. It is >= the hinge, exceeds it by at most ``tau * log C`` and tends to
    it as tau -> 0. The j = y term contributes exp(0), so the loss is > 0; log-sum-exp
    subtracts the row maximum before exponentiating, so large scores / small tau do not
    overflow.

    Shapes: logits (M, C), target (M,) long -> (M,)
    """
    if not tau > 0:
        raise ValueError(f"smooth_top1_svm: tau={tau!r} must be > 0; tau -> 0 is the hinge loss")
    classes = torch.arange(logits.shape[1], device=logits.device)  # (C,)
    margin = alpha * (classes[None, :] != target[:, None]).to(logits.dtype)  # (M, C)
    true = logits.gather(1, target[:, None])  # (M, 1)
    return tau * torch.logsumexp((margin + logits - true) / tau, dim=1)  # (M,)


def clustering_targets(
    attention: Tensor, mask: Tensor, k_sample: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k (target 1) and bottom-k (target 0) attended real instances of each bag.

    k = min(k_sample, floor(n_b / 2)) per bag; slots beyond a bag's k are marked invalid.

    Shapes: attention (B, N), mask (B, N) -> index (B, 2K), target (B, 2K), valid (B, 2K)
        with K = max(1, max_b k_b)
    """
    n = mask.sum(dim=1)  # (B,)
    k = torch.clamp(n // 2, max=k_sample)  # (B,)
    width = max(1, int(k.max()))
    ranked = attention.masked_fill(~mask, float("-inf"))  # (B, N): padding ranks last
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N)
    j = torch.arange(width, device=mask.device)[None, :]  # (1, K)
    top = order[:, :width]  # (B, K)
    bottom = order.gather(1, (n[:, None] - 1 - j).clamp_min(0))  # (B, K): least attended real
    index = torch.cat([top, bottom], dim=1)  # (B, 2K)
    target = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)], dim=1)  # (B, 2K)
    valid = (j < k[:, None]).repeat(1, 2)  # (B, 2K)
    return index, target, valid


@register_model(
    "clam-sb",
    CLAMParams,
    "CLAM-SB (Lu et al. 2021): gated attention + top/bottom-k instance clustering loss",
)
class CLAMSB(MILModel):
    """Single-branch CLAM; ``predict`` returns the attention weights as instance scores.

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C); attention (B, N), 0 at padding.
    """

    def __init__(self, in_dim: int, n_classes: int, params: CLAMParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        dim, attn, p = params.embed_dim, params.attn_dim, params.dropout
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(p))
        self.attn_a = nn.Sequential(nn.Linear(dim, attn), nn.Tanh(), nn.Dropout(p))
        self.attn_b = nn.Sequential(nn.Linear(dim, attn), nn.Sigmoid(), nn.Dropout(p))
        self.attn_c = nn.Linear(attn, 1)
        self.head = nn.Linear(dim, n_classes)
        self.instance_head = nn.Linear(dim, 2 * n_classes)  # C classifiers of 2 logits each

    def _attend(self, x: Tensor, mask: Tensor) -> tuple[Encoding, Tensor]:
        """Shapes: x (B, N, D), mask (B, N) -> Encoding, instance embeddings (B, N, L)"""
        check_batch(x, mask, self.in_dim)
        h = self.embed(x)  # (B, N, L)
        score = self.attn_c(self.attn_a(h) * self.attn_b(h)).squeeze(-1)  # (B, N)
        a = masked_softmax(score, mask)  # (B, N)
        bag = torch.einsum("bn,bnl->bl", a, h)  # (B, L)
        return Encoding(logits=self.head(bag), bag=bag, scores=a), h

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Shapes: x (B, N, D), mask (B, N) -> logits (B, C), bag (B, L), scores (B, N)"""
        return self._attend(x, mask)[0]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Shapes: x (B, N, D), mask (B, N) -> (B, C)"""
        return self._attend(x, mask)[0].logits

    def instance_loss(self, h: Tensor, attention: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        """Clustering loss (smooth SVM or CE) of the true class's instance classifier, plus
        the other classes' out-of-class terms with ``subtyping``.

        Each term is a mean over the bag's valid selected instances; the bag's loss is the
        in-class term (or, with subtyping, the mean over all C classifiers' terms); the
        result is the mean over ALL bags of the batch.

        Shapes: h (B, N, L), attention (B, N), mask (B, N), target (B,) -> scalar
        """
        b, n, _ = h.shape
        c = self.n_classes
        index, pseudo, valid = clustering_targets(attention.detach(), mask, self.params.k_sample)
        logits = self.instance_head(h).view(b, n, c, 2)  # (B, N, C, 2)
        picked = logits.gather(1, index[:, :, None, None].expand(-1, -1, c, 2))  # (B, 2K, C, 2)
        own = target[:, None, None, None].expand(-1, index.shape[1], 1, 2)  # (B, 2K, 1, 2)
        in_class = self._pseudo_label_loss(picked.gather(2, own).squeeze(2), pseudo)  # (B, 2K)
        per_bag = (in_class * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)  # (B,)
        if self.params.subtyping and c > 1:
            k = index.shape[1] // 2
            top, top_valid = picked[:, :k], valid[:, :k]  # (B, K, C, 2), (B, K)
            out = self._pseudo_label_loss(top.flatten(1, 2), pseudo.new_zeros(b, k * c))  # (B, K*C)
            out = (out.view(b, k, c) * top_valid[:, :, None]).sum(dim=1)  # (B, C)
            out = out / top_valid.sum(dim=1, keepdim=True).clamp_min(1)  # (B, C): per class
            others = torch.ones_like(out).scatter(1, target[:, None], 0.0)  # (B, C): c != y
            per_bag = (per_bag + (out * others).sum(dim=1)) / c
        return per_bag.mean()

    def _pseudo_label_loss(self, logits: Tensor, pseudo: Tensor) -> Tensor:
        """Per-instance clustering loss. Shapes: logits (B, M, 2), pseudo (B, M) -> (B, M)"""
        flat, labels = logits.flatten(0, 1), pseudo.flatten()
        p = self.params
        if p.instance_loss == "svm":
            each = smooth_top1_svm(flat, labels, p.svm_tau, p.svm_alpha)
        else:
            each = F.cross_entropy(flat, labels, reduction="none")
        return each.view(pseudo.shape)


    def encode_loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Encoding, Tensor, dict[str, float]]:
        """``bag_weight * CE(bag) + (1 - bag_weight) * instance clustering loss``, with the
        encoding behind it. parts: ``ce`` (bag) and ``instance``."""
        enc, h = self._attend(x, mask)
        ce = F.cross_entropy(enc.logits, target, weight=class_weight)
        inst = self.instance_loss(h, enc.scores, mask, target)
        w = self.params.bag_weight
        loss = w * ce + (1.0 - w) * inst
        return enc, loss, {"ce": float(ce.detach()), "instance": float(inst.detach())}

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        return self.encode(x, mask).prediction()
