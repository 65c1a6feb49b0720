"""MRAN (Xiang et al., Medical Image Analysis 2023): multi-scale representation attention.

In the paper, the upstream network weighs patches and cells of a region by *representation
attention*: the norm of a representation (or of its class logits), thresholded and
renormalised, with ONE classifier shared by every level and a loss at every level; a
downstream attention MIL pools the regions of a case and its attention is fed back as region
weights. Features here are cached (no CNN fine-tuning), so the two alternating networks
become one joint model over a patient's captures grouped by scale (magnification folder or
crop scale; ``Bag.scales``, see docs/multiscale.md):

1. instance MLP: h_n (L,) per capture; the shared classifier gives instance logits;
2. representation attention within each scale s: alpha_n = ||h_n|| (``attention: feature``)
   or ||logits_n|| (``attention: logit``) over the captures of that scale, weights below
   ``threshold`` x the scale's largest set to 0, renormalised; scale embedding
   z_s = sum_n alpha_n h_n;
3. case level (the downstream attention MIL): tanh attention (Ilse et al. 2018) over the
   scale embeddings present in the bag; z = sum_s a_s z_s; logits = classifier(z);
4. loss = CE(case) + r(t) * [scale_weight * sum_s a_s CE(classifier(z_s))
   + instance_weight * sum_n a_{s(n)} alpha_n CE(classifier(h_n))], where the detached
   case attention a plays the paper's fed-back region weights (``feedback``; otherwise
   every present scale counts equally) and r(t) ramps the auxiliary terms up over the
   first ``ramp_up`` of training. Scales absent from a bag get weight 0.

``forward``/``predict``/``loss``/``encode`` take ``(x, mask)`` and treat every instance as
scale 0 (single-scale data: MUSK, UCSB, ...); ``predict_batch``/``loss_batch`` read
``batch.scales``. Every parameter-owning module takes one tensor and each bag's loss
depends on that bag only, so Opacus per-patient gradients apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micromil_core.data.bag import BagBatch
from micromil_core.errors import ConfigError
from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.pooling import check_batch, mlp
from micromil_core.models.registry import check_choice, check_float, check_int, register_model
from micromil_core.nn import masked_softmax

ATTENTIONS = ("feature", "logit")
# Inside the square root: keeps the norm differentiable where a representation is all zero
# (a ReLU embedding can be).
_NORM_EPS = 1e-6
# Laine & Aila (ICLR 2017) sigmoid-shaped ramp-up exp(-5 (1 - t/T)^2), the usual schedule
# for auxiliary terms that are unreliable early in training.
_RAMP_SHAPE = 5.0


@dataclass(frozen=True)
class MRANParams:
    """Hyper-parameters of ``mran``.

    ``scale_weight`` = 1/lambda and ``instance_weight`` = 1/lambda^2 with lambda = 5:
    METHODS.md gives the paper's level weights as "lambda = 5 and lambda^2 with a ramp-up";
    we let each finer level count lambda times less than the one above it (case : scale :
    instance = 1 : 0.2 : 0.04), because finer levels inherit the case label and are the
    noisier targets. Set them to 5 and 25 for the other reading. ``threshold`` 0.1 and
    ``ramp_up`` 0.2 are our choices (the paper's values were not retrievable).
    Embedding widths follow ``abmil`` (Ilse et al.'s MUSK network).
    """

    n_scales: int = 4  # scale indices 0..n_scales-1 (e.g. BreakHis 40/100/200/400x)
    embed_dims: tuple[int, ...] = (256, 128)  # instance MLP widths; () = raw features
    attention: str = "feature"  # norm of the representation (feature) or its logits
    threshold: float = 0.1  # weights below this fraction of the scale's largest -> 0
    attn_dim: int = 128  # case-level attention hidden size
    scale_weight: float = 0.2
    instance_weight: float = 0.04
    ramp_up: float = 0.2  # fraction of training over which auxiliary weights ramp up
    feedback: bool = True  # weight scale/instance losses by the case attention
    dropout: float = 0.25

    def __post_init__(self) -> None:
        check_int("mran", "n_scales", self.n_scales, 1)
        for d in self.embed_dims:
            check_int("mran", "embed_dims", d, 1)
        check_choice("mran", "attention", self.attention, ATTENTIONS)
        check_float("mran", "threshold", self.threshold, 0.0, 1.0, high_inclusive=False)
        check_int("mran", "attn_dim", self.attn_dim, 1)
        check_float("mran", "scale_weight", self.scale_weight, 0.0, math.inf)
        check_float("mran", "instance_weight", self.instance_weight, 0.0, math.inf)
        check_float("mran", "ramp_up", self.ramp_up, 0.0, 1.0)
        check_float("mran", "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)


@dataclass
class MRANOutput:
    """Everything one MRAN pass computes (B bags, N instances, S = n_scales, C classes).

    Shapes:
        logits: (B, C) case logits
        bag: (B, L) case embedding
        scale_logits: (B, S, C) the shared classifier on each scale embedding
        instance_logits: (B, N, C) the shared classifier on each instance
        present: (B, S) bool, the bag has instances of that scale
        case_attention: (B, S) attention over scales, 0 where absent, sums to 1
        scale_attention: (B, S, N) representation attention within each scale, rows of
            present scales sum to 1, 0 outside the scale and at padding
        scores: (B, N) each instance's share of the case embedding, sums to 1
    """

    logits: Tensor
    bag: Tensor
    scale_logits: Tensor
    instance_logits: Tensor
    present: Tensor
    case_attention: Tensor
    scale_attention: Tensor
    scores: Tensor


@register_model(
    "mran",
    MRANParams,
    "multi-scale representation attention (Xiang et al. 2023): norm attention per scale, "
    "case attention over scales, one shared classifier",
)
class MRAN(MILModel):
    """Multi-scale representation attention MIL.

    Shapes: x (B, N, D), mask (B, N), scales (B, N) int64 -> logits (B, C)
    """

    def __init__(self, in_dim: int, n_classes: int, params: MRANParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        self.embed = mlp(in_dim, params.embed_dims, params.dropout)
        width = params.embed_dims[-1] if params.embed_dims else in_dim
        self.head = nn.Linear(width, n_classes)  # shared by case, scale and instance level
        # With one scale the case attention is the identity: no parameters to leave idle.
        self.case_v = nn.Linear(width, params.attn_dim) if params.n_scales > 1 else None
        self.case_w = nn.Linear(params.attn_dim, 1) if params.n_scales > 1 else None
        # Outside a trainer (no set_progress calls) the auxiliary terms get full weight.
        self._progress = 1.0

    # --- training-strategy hooks --------------------------------------------------------

    def set_progress(self, fraction: float) -> None:
        self._progress = float(fraction)

    def aux_factor(self) -> float:
        """Ramp-up factor r(t) in (0, 1] of the scale and instance losses."""
        span = self.params.ramp_up
        if span <= 0.0 or self._progress >= span:
            return 1.0
        return math.exp(-_RAMP_SHAPE * (1.0 - max(self._progress, 0.0) / span) ** 2)

    # --- the model ----------------------------------------------------------------------

    def check_scales(self, scales: Tensor, mask: Tensor) -> None:
        """Raise ``ConfigError`` unless the real instances' scales lie in [0, n_scales)."""
        if tuple(scales.shape) != tuple(mask.shape) or scales.is_floating_point():
            raise ConfigError(
                f"scales have shape {tuple(scales.shape)} and dtype {scales.dtype}; expected "
                f"integers of shape {tuple(mask.shape)} (one scale index per instance)"
            )
        real = scales[mask]
        if real.numel() == 0:
            return
        low, high = int(real.min()), int(real.max())
        if low < 0:
            raise ConfigError(
                f"model 'mran': scale index {low} in the batch; scale indices must be >= 0 "
                "(re-extract the features or fix the 'scales' of the feature files)"
            )
        if high >= self.params.n_scales:
            raise ConfigError(
                f"model 'mran': scale index {high} in the batch but n_scales="
                f"{self.params.n_scales}; set model.params.n_scales={high + 1} (or more), "
                "the number of magnifications/crop scales of the federation"
            )

    def run(self, x: Tensor, mask: Tensor, scales: Tensor | None = None) -> MRANOutput:
        """One pass; ``scales`` None means every instance is scale 0.

        Shapes: x (B, N, D), mask (B, N), scales (B, N) -> MRANOutput (see its docstring)
        """
        check_batch(x, mask, self.in_dim)
        if scales is None:
            scales = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        else:
            self.check_scales(scales, mask)
        n_scales = self.params.n_scales
        h = self.embed(x)  # (B, N, L)
        inst_logits = self.head(h)  # (B, N, C)
        rep = h if self.params.attention == "feature" else inst_logits
        norm = torch.sqrt(rep.pow(2).sum(-1) + _NORM_EPS)  # (B, N)
        levels = torch.arange(n_scales, device=scales.device)  # (S,)
        member = mask[:, None, :] & (scales[:, None, :] == levels[None, :, None])  # (B, S, N)
        alpha = torch.where(member, norm[:, None, :], torch.zeros_like(norm[:, None, :]))
        if self.params.threshold > 0:
            # The comparison carries no gradient; the kept weights still do.
            peak = alpha.detach().amax(dim=-1, keepdim=True)  # (B, S, 1)
            alpha = alpha * (alpha.detach() >= self.params.threshold * peak)  # (B, S, N)
        alpha = alpha / alpha.sum(-1, keepdim=True).clamp_min(1e-12)  # (B, S, N)
        z_scale = torch.einsum("bsn,bnl->bsl", alpha, h)  # (B, S, L)
        present = member.any(dim=-1)  # (B, S)
        if self.case_v is None:
            a = present.to(h.dtype)  # (B, 1): the single scale
        else:
            e = self.case_w(torch.tanh(self.case_v(z_scale))).squeeze(-1)  # (B, S)
            a = masked_softmax(e, present)  # (B, S)
        z = torch.einsum("bs,bsl->bl", a, z_scale)  # (B, L)
        return MRANOutput(
            logits=self.head(z),  # (B, C)
            bag=z,
            scale_logits=self.head(z_scale),  # (B, S, C)
            instance_logits=inst_logits,
            present=present,
            case_attention=a,
            scale_attention=alpha,
            scores=torch.einsum("bs,bsn->bn", a, alpha),  # (B, N)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Shapes: x (B, N, D), mask (B, N) -> (B, C); every instance is scale 0."""
        return self.run(x, mask).logits

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Case logits, case embedding and each instance's share of it (scale 0 only).

        Shapes: x (B, N, D), mask (B, N) -> logits (B, C), bag (B, L), scores (B, N)
        """
        return self._encoding(self.run(x, mask))

    @staticmethod
    def _encoding(out: MRANOutput) -> Encoding:
        return Encoding(logits=out.logits, bag=out.bag, scores=out.scores)

    # --- predictions and losses ---------------------------------------------------------

    @staticmethod
    def _prediction(out: MRANOutput) -> Prediction:
        scale_probs = torch.softmax(out.scale_logits, dim=-1) * out.present[..., None]
        return Prediction(
            probs=torch.softmax(out.logits, dim=-1),
            instance_scores=out.scores,
            extras={"scale_attention": out.case_attention, "scale_probs": scale_probs},
        )

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        """Prediction with ``extras``: ``scale_attention`` (B, S), ``scale_probs`` (B, S, C)."""
        return self._prediction(self.run(x, mask))

    @torch.no_grad()
    def predict_batch(self, batch: BagBatch) -> Prediction:
        return self._prediction(self.run(batch.x, batch.mask, batch.scales))

    def encode_loss(
        self, x: Tensor, mask: Tensor, target: Tensor, class_weight: Tensor | None = None
    ) -> tuple[Encoding, Tensor, dict[str, float]]:
        """Case, scale and instance terms (scale 0 only) with the encoding behind them."""
        out = self.run(x, mask)
        return (self._encoding(out), *self._loss(out, mask, target, class_weight))

    def loss_batch(
        self, batch: BagBatch, class_weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        out = self.run(batch.x, batch.mask, batch.scales)
        return self._loss(out, batch.mask, batch.y, class_weight)

    def _loss(
        self, out: MRANOutput, mask: Tensor, target: Tensor, class_weight: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        """Case CE plus the ramped scale- and instance-level terms; a sum of per-bag terms
        (each bag's loss depends on that bag only, as per-patient DP-SGD needs)."""
        p = self.params
        ce = F.cross_entropy(out.logits, target, weight=class_weight)
        n_bags, n_scales, n_classes = out.scale_logits.shape
        n_inst = out.instance_logits.shape[1]
        ce_scale = F.cross_entropy(
            out.scale_logits.reshape(-1, n_classes), target.repeat_interleave(n_scales),
            reduction="none",
        ).reshape(n_bags, n_scales)  # (B, S)
        ce_inst = F.cross_entropy(
            out.instance_logits.reshape(-1, n_classes), target.repeat_interleave(n_inst),
            reduction="none",
        ).reshape(n_bags, n_inst)  # (B, N)
        ce_inst = ce_inst.masked_fill(~mask, 0.0)  # padding: garbage logits stay out
        present = out.present.to(ce_scale.dtype)  # (B, S)
        if p.feedback:
            share = out.case_attention.detach()  # (B, S)
        else:
            share = present / present.sum(-1, keepdim=True)  # (B, S)
        inst_share = torch.einsum("bs,bsn->bn", share, out.scale_attention.detach())  # (B, N)
        aux = p.scale_weight * (share * ce_scale).sum(-1) + p.instance_weight * (
            inst_share * ce_inst
        ).sum(-1)  # (B,)
        # The same (class-weighted) mean over bags as the case cross-entropy.
        w = class_weight[target] if class_weight is not None else torch.ones_like(aux)  # (B,)
        factor = self.aux_factor()
        loss = ce + factor * (w * aux).sum() / w.sum()
        parts = {"ce": float(ce.detach()), "aux_factor": factor}
        with torch.no_grad():
            for s in range(n_scales):
                has = out.present[:, s]
                if bool(has.any()):
                    parts[f"ce_scale{s}"] = float(ce_scale[has, s].mean())
            parts["ce_instance"] = float((inst_share * ce_inst).sum(-1).mean())
        return loss, parts
