"""MHIM-MIL: masked hard instance mining around a base MIL model.

Tang et al., "Multiple Instance Learning Framework with Masked Hard Instance Mining for
Whole Slide Image Classification", ICCV 2023 (v1), and the extension arXiv 2509.11526 (v2).
See ``shared/METHODS.md`` and ``docs/mhim.md``.

The registered model ``mhim`` wraps any registered model that implements ``encode``
(the *student*). Training, per batch:

1. a *teacher* (a copy of the student updated only by EMA, never by gradient) encodes
   the full bags, in eval mode and without gradient: instance scores + bag embeddings;
2. the student's bag mask loses the top ``mask_ratio_high`` share of real instances by
   teacher score ("easy", salient ones; cosine-decayed to 0 over training), optionally the
   lowest-scored ``mask_ratio_low`` share, then a random ``mask_ratio_random`` share of
   the rest; at least one instance per bag is always kept;
3. optionally (v2) ``recycle_tokens`` global query tokens cross-attend to the randomly
   dropped instances and are appended to the kept ones as extra instances;
4. loss = the base's own loss on the masked bag (its bag cross-entropy plus any auxiliary
   terms it has, e.g. DSMIL's max-instance stream) + ``consistency_weight`` *
   KL(softmax(teacher bag / t_teacher) || softmax(student bag / t_student)).

Inference (``forward``/``predict``/``encode`` and ``loss`` in eval mode) is the student
alone on the full bag. Only the student (and the recycle network, when on) are submodules,
so ``state_dict``, checkpoints and federated messages carry exactly the base model's
tensors: the teacher lives outside the module tree and is rebuilt from the student by
``start_training`` (at the start of a ``fit``, i.e. of each federated round).

Steps 2 and 3 (the mask and the recycle network) live in ``mhim_masking.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from micromil_core.data.bag import BagBatch
from micromil_core.errors import ConfigError
from micromil_core.models.base import Encoding, MILModel, Prediction
from micromil_core.models.mhim_masking import NAME, RecycleNetwork, hard_instance_mask
from micromil_core.models.registry import (
    build_model,
    check_choice,
    check_float,
    check_int,
    full_params,
    model_class,
    model_names,
    register_model,
)

MOMENTUM_SCHEDULES = ("constant", "cosine")
TEACHER_INITS = ("warmup", "converged")


def encodable_models() -> list[str]:
    """Registered models MHIM can wrap: those implementing ``MILModel.encode``."""
    return [
        n for n in model_names() if n != NAME and model_class(n).encode is not MILModel.encode
    ]


@dataclass(frozen=True)
class MHIMParams:
    """Hyper-parameters of ``mhim``; paper values are for gigapixel slides (docs/mhim.md).

    ``base_params`` is normalised to the base model's full params dict (defaults filled
    in), so ``params_to_dict`` round-trips and checkpoints rebuild the same model.
    """

    base: str = "abmil"  # any registered model implementing encode()
    base_params: Mapping[str, Any] = field(default_factory=dict)
    # Share of a bag's real instances masked for being the teacher's top-scored ones,
    # cosine-decayed to 0 at the end of training. The paper masks 1-3% of ~10^4 slide
    # patches; microscopy bags hold tens of images, so 10% ~ the single most salient one.
    mask_ratio_high: float = 0.1
    # The high mask draws its instances at random from the top mask_ratio_high / this
    # share (paper's mask_ratio_hr = 0.5 on CAMELYON16), so the same instance is not
    # always the one hidden; 1.0 = exactly the top mask_ratio_high.
    mask_high_sample: float = 0.5
    mask_ratio_low: float = 0.0  # lowest-scored share masked (v1; 0 on C16, 0.2 on TCGA)
    mask_ratio_random: float = 0.5  # random share of the rest (v1: 0.5 C16, 0.7 TCGA)
    consistency_weight: float = 0.1  # paper: 0.1 (C16) to 0.5 (TCGA)
    teacher_temperature: float = 0.1  # paper
    student_temperature: float = 1.0  # paper
    momentum: float = 0.9999  # teacher EMA momentum (paper)
    momentum_schedule: str = "constant"  # "cosine": momentum -> 1.0 by the end (paper option)
    # Share of training progress trained plainly (the base's own loss, no masking) while
    # the teacher copies the student: stands in for the paper's teacher initialised from
    # a converged baseline, so the teacher's scores mean something when masking starts.
    warmup: float = 0.2
    # "converged" (local training): the paper's protocol. `micromil train/cv` first trains
    # the base alone with early stopping on validation, then starts teacher and student
    # from that converged model and trains with masking for a second run of train.epochs;
    # `warmup` is then unused. In a federation it means no warmup: the teacher starts from
    # each round's global model (start it from a baseline with federation.initial_model).
    teacher_init: str = "warmup"
    recycle_tokens: int = 0  # v2 global recycle network: k query tokens; 0 = off
    recycle_dim: int = 128  # cross-attention width of the recycle network
    recycle_heads: int = 4
    recycle_momentum: float = 0.9998  # EMA of the global query tokens (authors' code)

    def __post_init__(self) -> None:
        valid = encodable_models()
        if self.base not in valid:
            why = (
                "MHIM cannot wrap itself"
                if self.base == NAME
                else "it does not implement MILModel.encode"
                if self.base in model_names()
                else "it is not a registered model"
            )
            raise ConfigError(
                f"model {NAME!r}: param base={self.base!r} cannot be wrapped ({why}); "
                f"choose one of {', '.join(valid)}"
            )
        if not isinstance(self.base_params, Mapping):
            raise ConfigError(
                f"model {NAME!r}: param base_params={self.base_params!r} must be a mapping of "
                f"{self.base!r} params, e.g. {{dropout: 0.25}}"
            )
        try:
            full = full_params(self.base, self.base_params)
        except ConfigError as exc:
            raise ConfigError(f"model {NAME!r}: base_params of base {self.base!r}: {exc}") from None
        object.__setattr__(self, "base_params", full)  # frozen: normalise once, here
        for key in ("mask_ratio_high", "mask_ratio_low"):
            check_float(NAME, key, getattr(self, key), 0.0, 1.0)
        check_float(NAME, "mask_high_sample", self.mask_high_sample, 1e-3, 1.0)
        check_float(NAME, "mask_ratio_random", self.mask_ratio_random, 0.0, 1.0, False)
        check_float(NAME, "consistency_weight", self.consistency_weight, 0.0, math.inf)
        check_float(NAME, "teacher_temperature", self.teacher_temperature, 1e-6, math.inf)
        check_float(NAME, "student_temperature", self.student_temperature, 1e-6, math.inf)
        check_float(NAME, "momentum", self.momentum, 0.0, 1.0)
        check_choice(NAME, "momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        check_float(NAME, "warmup", self.warmup, 0.0, 1.0, high_inclusive=False)
        check_choice(NAME, "teacher_init", self.teacher_init, TEACHER_INITS)
        check_int(NAME, "recycle_tokens", self.recycle_tokens, 0)
        check_int(NAME, "recycle_heads", self.recycle_heads, 1)
        check_int(NAME, "recycle_dim", self.recycle_dim, self.recycle_heads)
        if self.recycle_dim % self.recycle_heads:
            raise ConfigError(
                f"model {NAME!r}: recycle_dim={self.recycle_dim} is not divisible by "
                f"recycle_heads={self.recycle_heads}; pick e.g. recycle_dim="
                f"{self.recycle_heads * max(1, self.recycle_dim // self.recycle_heads)}"
            )
        check_float(NAME, "recycle_momentum", self.recycle_momentum, 0.0, 1.0)


def base_checkpoint_fits(base_name: str, base_params: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """Can a checkpoint of model ``base_name`` with ``base_params`` start an MHIM model with
    ``params``? Only when it is the wrapped base with the same (full) params."""
    return base_name == params.get("base") and dict(
        full_params(base_name, base_params)
    ) == dict(params.get("base_params") or {})


def state_from_base(base_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A base model's weights as MHIM's student weights (the teacher is not state)."""
    return {f"student.{k}": v for k, v in base_state.items()}


def cosine_to_zero(progress: float, start: float) -> float:
    """Weight going 1 -> 0 on a half cosine as ``progress`` goes ``start`` -> 1."""
    t = min(max((progress - start) / (1.0 - start), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def consistency_loss(student_bag: Tensor, teacher_bag: Tensor, t_student: float,
                     t_teacher: float) -> Tensor:
    """KL(softmax(teacher / t_teacher) || softmax(student / t_student)), mean over bags.

    The paper's soft cross-entropy minus the teacher's entropy: the same gradient (the
    teacher is a constant), but 0 when the two agree, so the logged value is readable.

    Shapes: student_bag (B, L), teacher_bag (B, L) -> scalar
    """
    log_s = F.log_softmax(student_bag.float() / t_student, dim=-1)  # (B, L)
    log_t = F.log_softmax(teacher_bag.detach().float() / t_teacher, dim=-1)  # (B, L)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


# --- the wrapper --------------------------------------------------------------------------


@register_model(
    NAME,
    MHIMParams,
    "MHIM-MIL (Tang et al. 2023/2025): EMA teacher masks a base model's salient instances",
)
class MHIM(MILModel):
    """MHIM-MIL around ``params.base``; see the module docstring.

    Shapes: x (B, N, D), mask (B, N) -> logits (B, C) (the student's, on the full bag)
    """

    def __init__(self, in_dim: int, n_classes: int, params: MHIMParams) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.params = in_dim, n_classes, params
        self.student = build_model(params.base, in_dim, n_classes, params.base_params)
        self.recycle = (
            RecycleNetwork(
                in_dim,
                params.recycle_tokens,
                params.recycle_dim,
                params.recycle_heads,
                params.recycle_momentum,
            )
            if params.recycle_tokens
            else None
        )
        teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        # A plain list keeps the teacher out of nn.Module's registry: not in state_dict,
        # parameters() or federated messages; ``_apply`` moves it with the student.
        self._teacher: list[MILModel] = [teacher]
        self.progress = 0.0
        self.baseline_stage = False  # trainer.fit's first stage (teacher_init: converged)

    @property
    def teacher(self) -> MILModel:
        """The EMA teacher (eval mode, no gradients); not a submodule."""
        return self._teacher[0]

    @property
    def head_modules(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"student.{m}" for m in self.student.head_modules)

    @property
    def couples_bags(self) -> bool:  # type: ignore[override]
        # The recycle queries are an EMA of other patients' data carried from step to step
        # without noise, so per-patient DP-SGD cannot account for them: refuse DP then.
        return self.student.couples_bags or self.recycle is not None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MHIM:
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)  # .to(device) / .double() reach the teacher too
        return self

    # --- schedules -----------------------------------------------------------------------

    @property
    def needs_baseline_stage(self) -> bool:  # type: ignore[override]
        return self.params.teacher_init == "converged"

    def set_baseline_stage(self, on: bool) -> None:
        self.baseline_stage = bool(on)

    @property
    def mining_start(self) -> float:
        """Training progress at which masking starts (and its schedules begin)."""
        return 0.0 if self.needs_baseline_stage else self.params.warmup

    @property
    def in_warmup(self) -> bool:
        return self.baseline_stage or self.progress < self.mining_start

    def mask_ratio_high_now(self) -> float:
        """``mask_ratio_high`` cosine-decayed from the start of mining (full) to 0 at 1."""
        if self.in_warmup:
            return 0.0
        return self.params.mask_ratio_high * cosine_to_zero(self.progress, self.mining_start)

    def momentum_now(self) -> float:
        """Teacher EMA momentum: constant, or cosine from ``momentum`` up to 1.0."""
        m = self.params.momentum
        if self.params.momentum_schedule == "constant":
            return m
        return 1.0 - (1.0 - m) * cosine_to_zero(self.progress, self.mining_start)

    # --- training-strategy hooks ---------------------------------------------------------

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Teacher := student (weights and buffers)."""
        state = self.student.state_dict()
        if state.keys() != self.teacher.state_dict().keys():
            # The student was swapped for another layout of itself (DP-SGD's dense GAT).
            self._teacher[0] = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.teacher.load_state_dict(state)

    def start_training(self) -> None:
        """The teacher starts from the weights being trained (a federated round: the
        received global model), so it never outlives a round; see docs/mhim.md."""
        self.sync_teacher()

    def finish_training(self) -> None:
        self.student.finish_training()

    def set_progress(self, fraction: float) -> None:
        self.progress = min(max(float(fraction), 0.0), 1.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Teacher EMA (during warmup the teacher copies the student) and recycle queries."""
        if self.in_warmup:
            self.sync_teacher()
        else:
            weight = 1.0 - self.momentum_now()
            for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
                t.lerp_(s.detach(), weight)
            for t, s in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
                t.copy_(s)
        if self.recycle is not None:
            self.recycle.update()

    @torch.no_grad()
    def init_from_data(
        self, x: Tensor, mask: Tensor, generator: torch.Generator | None = None
    ) -> None:
        self.student.init_from_data(x, mask, generator)
        self.sync_teacher()

    # --- inference: the student alone on the full bag ------------------------------------

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Shapes: x (B, N, D), mask (B, N) -> (B, C)"""
        return self.student(x, mask)

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        return self.student.encode(x, mask)

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        return self.student.predict(x, mask)

    @torch.no_grad()
    def predict_batch(self, batch: BagBatch) -> Prediction:
        return self.student.predict_batch(batch)

    # --- training loss -------------------------------------------------------------------

    def _plain(self) -> bool:
        """Eval mode and warmup use the base model's own loss on the full bag."""
        return not self.training or self.in_warmup

    def loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """MHIM loss in training after warmup; the student's own loss otherwise.

        ``parts``: ce, consistency (KL, 0 when teacher and student agree), masked (share
        of real instances hidden from the student), plus the base's parts when plain.

        Shapes: x (B, N, D), mask (B, N), target (B,) -> scalar
        """
        if self._plain():
            return _with_mhim_parts(self.student.loss(x, mask, target, class_weight))
        return self.mhim_loss(x, mask, target, class_weight)

    def loss_batch(
        self, batch: BagBatch, class_weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        if self._plain():
            return _with_mhim_parts(self.student.loss_batch(batch, class_weight))
        if bool((batch.scales[batch.mask] != 0).any()):
            # The masked loss reaches the base only through encode(x, mask): the student
            # would train without the scales it is evaluated with.
            raise ConfigError(
                f"model {NAME!r}: these bags carry scale indices other than 0 "
                f"(magnifications or crop scales), but MHIM's masked loss passes only "
                f"features to its base {self.params.base!r}; train {self.params.base!r} "
                "without mhim, or give the patients a single scale"
            )
        return self.mhim_loss(batch.x, batch.mask, batch.y, class_weight)

    def mhim_loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Teacher-masked student CE plus the teacher-student consistency term.

        Per bag, so one bag's loss depends on that bag only (DP-SGD's privacy unit).

        Shapes: x (B, N, D), mask (B, N), target (B,) -> scalar
        """
        prm = self.params
        with torch.no_grad():
            teacher = self.teacher.encode(x, mask)  # eval mode: no dropout or Gumbel noise
        keep, dropped = hard_instance_mask(
            teacher.scores,
            mask,
            high=self.mask_ratio_high_now(),
            low=prm.mask_ratio_low,
            random=prm.mask_ratio_random,
            high_sample=prm.mask_high_sample,
        )
        xs, ms = x, keep  # (B, N, D), (B, N)
        if self.recycle is not None:
            tokens, has = self.recycle(x, dropped)  # (B, k, D), (B,)
            xs = torch.cat([x, tokens.to(x.dtype)], dim=1)  # (B, N + k, D)
            ms = torch.cat([keep, has[:, None].expand(-1, tokens.shape[1])], dim=1)
        # The base's own full loss on the masked bag (not only a bag cross-entropy), so
        # e.g. DSMIL's instance stream and CLAM's clustering head keep training.
        student, base_loss, parts = self.student.encode_loss(xs, ms, target, class_weight)
        cons = consistency_loss(
            student.bag, teacher.bag, prm.student_temperature, prm.teacher_temperature
        )
        total = base_loss + prm.consistency_weight * cons
        masked = 1.0 - float(keep.sum()) / max(float(mask.sum()), 1.0)
        return total, {**parts, "consistency": float(cons.detach()), "masked": masked}


def _with_mhim_parts(
    result: tuple[Tensor, dict[str, float]],
) -> tuple[Tensor, dict[str, float]]:
    """The base's (loss, parts) with MHIM's parts at their no-masking values."""
    loss, parts = result
    return loss, {**parts, "consistency": 0.0, "masked": 0.0}


__all__ = [
    "MHIM",
    "MHIMParams",
    "RecycleNetwork",
    "consistency_loss",
    "cosine_to_zero",
    "encodable_models",
    "hard_instance_mask",
]
