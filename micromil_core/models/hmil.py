"""Hierarchical MIL (Jin et al., IEEE TMI 2025, arXiv 2411.07660): ``hmil``.

For labels with a two-level hierarchy (fine labels that each belong to one coarse label,
e.g. BRACS' 7 subtypes in 3 groups). Two branches read the same instances:

* coarse: an instance MLP, class-wise gated attention giving one bag embedding per coarse
  class, each scored by one shared ``Linear(d, 1)``;
* fine: a further projection of the coarse embedding, class-wise gated attention giving
  one bag embedding per fine class, each scored by its own linear scorer (``fine_scorer:
  per-class``; ``shared`` uses one ``Linear(d', 1)`` as the coarse branch does).

Training loss (``loss_batch``; see :meth:`HMIL.loss_parts`)::

    alpha * CE_coarse + CE_fine + w_bag * L_bag + w_inst * L_inst + (1 - alpha) * w_con * L_con

``L_bag``: the fine probabilities summed within each coarse class must predict the coarse
label (NLL of the log of the summed probability). ``L_inst``: 1 - cosine between each
coarse class's attention and the summed attention of its fine classes. ``L_con``:
supervised contrastive loss (Khosla et al., NeurIPS 2020) on the L2-normalised embedding of
each bag's own fine class, temperature on a cosine schedule ``temp_max -> temp_min ->
temp_max`` over training. ``alpha = 1 - progress^2`` is the curriculum weight that fades the
coarse CE out and the contrastive term in (progress = ``set_progress``'s fraction).

Bags without a fine label (``y_fine == -1``) contribute only the coarse terms (CE_coarse,
L_bag, L_inst). The contrastive term couples the bags of a batch, so ``couples_bags`` is
True and DP-SGD refuses the model; with fewer than two fine-labelled bags in a batch (e.g.
``train.batch_size: 1``) it is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micromil_core.data.bag import BagBatch
from micromil_core.errors import ConfigError
from micromil_core.models.base import MILModel, Prediction
from micromil_core.models.pooling import check_batch, mlp
from micromil_core.models.registry import check_choice, check_float, check_int, register_model
from micromil_core.nn import ClassWiseLinear, GatedAttention, masked_softmax

NAME = "hmil"
FINE_SCORERS = ("shared", "per-class")


@dataclass(frozen=True)
class HMILParams:
    """Hyper-parameters of ``hmil``.

    ``fine_to_coarse`` lists the coarse class index of every fine class, in fine-class
    index order (``"0,0,0,1,1,2,2"`` for BRACS). Left empty, ``micromil train``/``cv``
    derive it from the training patients' ``label``/``fine_label`` pairs and store it in
    the checkpoint; a model built with it empty has one fine class per coarse class.
    The paper gives no loss weights in METHODS.md, so every term weighs 1 by default;
    widths mirror ``gated-abmil`` so the two compare at equal capacity.
    """

    fine_to_coarse: tuple[int, ...] = ()
    embed_dims: tuple[int, ...] = (256, 128)  # coarse instance MLP; () = raw features
    fine_dim: int = 128  # width of the fine branch's further projection
    attn_dim: int = 128
    dropout: float = 0.25
    bag_align_weight: float = 1.0  # L_bag
    inst_align_weight: float = 1.0  # L_inst
    contrastive_weight: float = 1.0  # L_con (before the curriculum factor 1 - alpha)
    temp_max: float = 1.0  # contrastive temperature at the start and end of training
    temp_min: float = 0.1  # ... and at mid-training (cosine schedule)
    # "per-class": one linear scorer per fine class; "shared": one Linear(d', 1) as in the
    # coarse branch. With softmax attention a shared scorer can tell sibling fine classes
    # (coat vs pullover) apart only through WHICH instances each head picks; on fashion-hier's
    # validation split per-class scorers raised fine accuracy 0.72 -> 0.84 (seed 0).
    fine_scorer: str = "per-class"

    def __post_init__(self) -> None:
        for c in self.fine_to_coarse:
            check_int(NAME, "fine_to_coarse", c, 0)
        for d in self.embed_dims:
            check_int(NAME, "embed_dims", d, 1)
        check_int(NAME, "fine_dim", self.fine_dim, 1)
        check_int(NAME, "attn_dim", self.attn_dim, 1)
        check_float(NAME, "dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        for key in ("bag_align_weight", "inst_align_weight", "contrastive_weight"):
            check_float(NAME, key, getattr(self, key), 0.0, math.inf)
        check_float(NAME, "temp_min", self.temp_min, 1e-3, math.inf)
        check_float(NAME, "temp_max", self.temp_max, self.temp_min, math.inf)
        check_choice(NAME, "fine_scorer", self.fine_scorer, FINE_SCORERS)


@dataclass
class HMILOutput:
    """One forward pass of both branches.

    Shapes:
        coarse_logits: (B, C); fine_logits: (B, F)
        coarse_attn: (B, C, N); fine_attn: (B, F, N) -- each row sums to 1, 0 at padding
        fine_emb: (B, F, L') one bag embedding per fine class
    """

    coarse_logits: Tensor
    fine_logits: Tensor
    coarse_attn: Tensor
    fine_attn: Tensor
    fine_emb: Tensor


@register_model(
    NAME,
    HMILParams,
    "hierarchical MIL (Jin et al. 2025): coarse + fine class-wise attention, aligned; "
    "needs fine_label",
)
class HMIL(MILModel):
    """Hierarchical MIL; ``n_classes`` is the number of COARSE classes.

    ``predict`` returns coarse probabilities, the attention of the predicted coarse class as
    instance scores and ``extras["fine_probs"]`` (B, F).

    Shapes: x (B, N, D), mask (B, N) -> coarse logits (B, C); fine logits (B, F).
    """

    couples_bags = True  # the supervised contrastive term compares the bags of a batch
    head_modules = ("coarse_score", "fine_score")  # the scorers of the class embeddings

    def __init__(self, in_dim: int, n_classes: int, params: HMILParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        mapping = params.fine_to_coarse or tuple(range(n_classes))
        bad = [c for c in mapping if c >= n_classes]
        if bad:
            raise ConfigError(
                f"model {NAME!r}: fine_to_coarse={list(mapping)} names coarse class(es) {bad} "
                f"but the task has {n_classes} coarse classes (indices 0..{n_classes - 1})"
            )
        empty = sorted(set(range(n_classes)) - set(mapping))
        if empty:
            raise ConfigError(
                f"model {NAME!r}: fine_to_coarse={list(mapping)} gives coarse class(es) "
                f"{empty} no fine class; every coarse class needs at least one"
            )
        self.n_fine = len(mapping)
        # (F, C) one-hot membership: sums fine probabilities/attention into coarse classes.
        member = F.one_hot(torch.tensor(mapping), n_classes).float()
        self.register_buffer("membership", member, persistent=False)
        self._progress = 0.0

        self.embed = mlp(in_dim, params.embed_dims, params.dropout)
        width = params.embed_dims[-1] if params.embed_dims else in_dim
        self.coarse_attn = GatedAttention(width, params.attn_dim, n_classes)
        self.coarse_score = nn.Linear(width, 1)
        self.fine_proj = mlp(width, (params.fine_dim,), params.dropout)
        self.fine_attn = GatedAttention(params.fine_dim, params.attn_dim, self.n_fine)
        self.fine_score = (
            nn.Sequential(nn.Linear(params.fine_dim, 1), nn.Flatten(-2))
            if params.fine_scorer == "shared"
            else ClassWiseLinear(self.n_fine, params.fine_dim)
        )

    # --- forward ---------------------------------------------------------------------

    def run(self, x: Tensor, mask: Tensor) -> HMILOutput:
        """Both branches. Shapes: x (B, N, D), mask (B, N) -> HMILOutput (see its doc)."""
        check_batch(x, mask, self.in_dim)
        keep = mask[:, None, :]  # (B, 1, N)
        h = self.embed(x)  # (B, N, L)
        a_c = masked_softmax(self.coarse_attn(h).transpose(1, 2), keep)  # (B, C, N)
        z_c = torch.bmm(a_c, h)  # (B, C, L)
        h_f = self.fine_proj(h)  # (B, N, L')
        a_f = masked_softmax(self.fine_attn(h_f).transpose(1, 2), keep)  # (B, F, N)
        z_f = torch.bmm(a_f, h_f)  # (B, F, L')
        return HMILOutput(
            coarse_logits=self.coarse_score(z_c).squeeze(-1),  # (B, C)
            fine_logits=self.fine_score(z_f),  # (B, F)
            coarse_attn=a_c,
            fine_attn=a_f,
            fine_emb=z_f,
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Coarse logits. Shapes: x (B, N, D), mask (B, N) -> (B, C)"""
        return self.run(x, mask).coarse_logits

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        out = self.run(x, mask)
        probs = torch.softmax(out.coarse_logits, dim=-1)  # (B, C)
        pred = probs.argmax(dim=-1)  # (B,)
        scores = out.coarse_attn[torch.arange(len(pred)), pred]  # (B, N)
        fine = torch.softmax(out.fine_logits, dim=-1)  # (B, F)
        return Prediction(probs=probs, instance_scores=scores, extras={"fine_probs": fine})

    # --- schedules -------------------------------------------------------------------

    def set_progress(self, fraction: float) -> None:
        self._progress = min(max(float(fraction), 0.0), 1.0)

    def curriculum_weight(self) -> float:
        """alpha = 1 - progress^2: weight of the coarse CE (1 - alpha: contrastive)."""
        return 1.0 - self._progress**2

    def temperature(self) -> float:
        """Contrastive temperature: cosine temp_max -> temp_min (progress 0.5) -> temp_max."""
        p = self.params
        return p.temp_min + (p.temp_max - p.temp_min) * 0.5 * (
            1.0 + math.cos(2.0 * math.pi * self._progress)
        )

    # --- losses ----------------------------------------------------------------------

    def loss(
        self, x: Tensor, mask: Tensor, target: Tensor, class_weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Coarse labels only (no fine labels known): CE_coarse + L_bag + L_inst."""
        y_fine = torch.full_like(target, -1)
        return self.loss_parts(x, mask, target, y_fine, class_weight)

    def loss_batch(
        self, batch: BagBatch, class_weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        return self.loss_parts(batch.x, batch.mask, batch.y, batch.y_fine, class_weight)

    def loss_parts(
        self,
        x: Tensor,
        mask: Tensor,
        y: Tensor,
        y_fine: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The full HMIL loss (module docstring) and each of its parts.

        Shapes: x (B, N, D), mask (B, N), y (B,) coarse, y_fine (B,) fine or -1 -> scalar.
        """
        self._check_fine_labels(y, y_fine)
        p = self.params
        out = self.run(x, mask)
        alpha = self.curriculum_weight()
        ce = F.cross_entropy(out.coarse_logits, y, weight=class_weight)
        known = y_fine >= 0  # (B,)
        zero = out.fine_logits.new_zeros(())
        ce_fine = F.cross_entropy(out.fine_logits[known], y_fine[known]) if known.any() else zero
        bag = bag_alignment_loss(out.fine_logits, self.membership, y, class_weight)
        inst = attention_alignment_loss(out.coarse_attn, out.fine_attn, self.membership)
        emb = out.fine_emb[known, y_fine[known]]  # (M, L') each bag's own fine class
        con = supervised_contrastive_loss(emb, y_fine[known], self.temperature())
        total = (
            alpha * ce
            + ce_fine
            + p.bag_align_weight * bag
            + p.inst_align_weight * inst
            + (1.0 - alpha) * p.contrastive_weight * con
        )
        parts = {
            "ce": float(ce.detach()),
            "ce_fine": float(ce_fine.detach()),
            "align_bag": float(bag.detach()),
            "align_inst": float(inst.detach()),
            "contrastive": float(con.detach()),
            "alpha": alpha,
            "temperature": self.temperature(),
        }
        return total, parts

    def _check_fine_labels(self, y: Tensor, y_fine: Tensor) -> None:
        known = y_fine >= 0
        if not known.any():
            return
        top = int(y_fine.max())
        if top >= self.n_fine:
            raise ConfigError(
                f"model {NAME!r}: fine label index {top} but the model has {self.n_fine} fine "
                f"classes (fine_to_coarse={list(self.params.fine_to_coarse)}); set "
                "model.params.fine_to_coarse to the coarse index of every fine class, or "
                "leave it empty for `micromil train`/`cv` to derive it"
            )
        implied = self.membership.argmax(dim=1)[y_fine[known]]  # (M,)
        wrong = (implied != y[known]).nonzero().flatten()
        if wrong.numel():
            i = int(wrong[0])
            raise ConfigError(
                f"model {NAME!r}: a bag has fine label index {int(y_fine[known][i])}, which "
                f"fine_to_coarse maps to coarse class {int(implied[i])}, but its coarse label "
                f"is {int(y[known][i])}; fix model.params.fine_to_coarse or the labels"
            )


def bag_alignment_loss(
    fine_logits: Tensor, membership: Tensor, y: Tensor, class_weight: Tensor | None = None
) -> Tensor:
    """NLL of the coarse label under the fine probabilities summed per coarse class.

    Shapes: fine_logits (B, F), membership (F, C) one-hot, y (B,) -> scalar
    """
    p_coarse = torch.softmax(fine_logits, dim=-1) @ membership  # (B, C)
    # The clamp only guards log(0) under float32 underflow; p_coarse sums to 1.
    return F.nll_loss(p_coarse.clamp_min(1e-12).log(), y, weight=class_weight)


def attention_alignment_loss(coarse_attn: Tensor, fine_attn: Tensor, membership: Tensor) -> Tensor:
    """Mean over bags and coarse classes of 1 - cos(coarse attention, summed fine attention).

    Padded instances hold 0 in both, so they do not change the cosine.
    Shapes: coarse_attn (B, C, N), fine_attn (B, F, N), membership (F, C) -> scalar
    """
    summed = torch.einsum("bfn,fc->bcn", fine_attn, membership)  # (B, C, N)
    return (1.0 - F.cosine_similarity(coarse_attn, summed, dim=-1, eps=1e-8)).mean()


def supervised_contrastive_loss(emb: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on L2-normalised embeddings.

    Every bag with at least one other bag of its label is an anchor; its positives are
    those bags, its contrast set every other bag. 0 when no anchor exists (fewer than two
    bags, or all labels distinct).
    Shapes: emb (M, L), labels (M,) -> scalar
    """
    m = emb.shape[0]
    self_mask = torch.eye(m, dtype=torch.bool, device=emb.device)  # (M, M)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (M, M)
    anchors = positive.any(dim=1)  # (M,)
    if m < 2 or not anchors.any():
        return emb.new_zeros(())
    z = F.normalize(emb, dim=-1)  # (M, L)
    sim = (z @ z.T / temperature).masked_fill(self_mask, -math.inf)  # (M, M)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # (M, M)
    log_prob = log_prob.masked_fill(self_mask, 0.0)  # -inf on the diagonal is never used
    per_anchor = -(log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)  # (M,)
    return per_anchor[anchors].mean()
