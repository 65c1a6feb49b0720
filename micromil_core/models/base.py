"""The one contract every MIL model in micromil-fl follows.

``forward(x, mask) -> logits``, ``loss(x, mask, target) -> (loss, parts)`` and
``predict(x, mask) -> Prediction``. Inputs are dense padded bags (see
``micromil_core.data.bag``). Modules that own parameters take a single tensor, and
masking/sampling happens in parameter-free code, so Opacus can compute per-bag gradients.

Trainers (local, federated, DP-SGD) call only the batch-level entry points
``loss_batch``/``predict_batch``, so a model that needs more than ``(x, mask, y)`` (fine
labels for HMIL, scales for MRAN) overrides those two, and the training-strategy hooks
``start_training``/``set_progress``/``after_step`` (MHIM's EMA teacher, HMIL's curriculum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micromil_core.data.bag import BagBatch


@dataclass
class Prediction:
    """What ``predict`` returns for a batch of B bags.

    Shapes:
        probs: (B, C) class probabilities
        instance_scores: (B, N) attention / importance per instance (0 where padded), or None
        selected: (B, K) indices of representative instances (MicroMIL), or None
        adjacency: (B, K, K) graph between the selected instances (MicroMIL), or None
    """

    probs: Tensor
    instance_scores: Tensor | None = None
    selected: Tensor | None = None
    adjacency: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Encoding:
    """A batch of bags as a model's head sees them (what MHIM's teacher and student compare).

    Shapes:
        logits: (B, C) the model's output
        bag: (B, L) the bag embedding the classifier head reads
        scores: (B, N) instance importance (attention), 0 where padded; None if the model
            has no per-instance score
    """

    logits: Tensor
    bag: Tensor
    scores: Tensor | None

    def prediction(self) -> Prediction:
        """Class probabilities with the instance scores: what attention models predict."""
        return Prediction(probs=torch.softmax(self.logits, dim=-1), instance_scores=self.scores)


class MILModel(nn.Module):
    """Base class: subclasses implement ``forward`` and ``encode``; a model whose loss has
    more than the bag cross-entropy overrides ``encode_loss`` (``loss`` follows it).

    Attributes set by subclasses:
        in_dim: instance feature dimension D
        n_classes: number of bag classes C
    """

    in_dim: int
    n_classes: int
    # True when one bag's loss depends on the other bags of its batch (e.g. a contrastive
    # term): per-patient DP-SGD cannot bound one patient's influence then, so it refuses.
    couples_bags: bool = False
    # The classifier that reads the bag embedding, as module names: what a site keeps to
    # itself under ``federation.personalise: local-head``.
    head_modules: tuple[str, ...] = ("head",)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B, N, D), (B, N) -> (B, C)
        raise NotImplementedError

    def loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The training loss and its named ``parts``: ``encode_loss`` without the encoding,
        so a model states its loss once (in ``encode_loss``) and both entry points agree.

        Shapes: x (B, N, D), mask (B, N), target (B,) -> scalar, parts
        """
        if type(self).encode is MILModel.encode:  # a model with only ``forward``
            ce = F.cross_entropy(self(x, mask), target, weight=class_weight)
            return ce, {"ce": float(ce.detach())}
        return self.encode_loss(x, mask, target, class_weight)[1:]

    @torch.no_grad()
    def init_from_data(
        self, x: Tensor, mask: Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Data-dependent initialisation before training (e.g. MicroMIL's centroids).

        Called once by the trainer with a sample of TRAINING bags; a no-op by default.
        """

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor) -> Prediction:
        """Deterministic class probabilities (call under ``model.eval()``)."""
        return Prediction(probs=torch.softmax(self(x, mask), dim=-1))

    def encode(self, x: Tensor, mask: Tensor) -> Encoding:
        """Logits plus the bag embedding and instance scores behind them.

        Shapes: x (B, N, D), mask (B, N) -> Encoding (see its docstring).
        Models that implement it can be wrapped by training strategies such as MHIM.
        """
        raise NotImplementedError(
            f"model {type(self).__name__} does not expose its bag embedding and instance "
            "scores (MILModel.encode), so it cannot be wrapped by MHIM"
        )

    def encode_loss(
        self,
        x: Tensor,
        mask: Tensor,
        target: Tensor,
        class_weight: Tensor | None = None,
    ) -> tuple[Encoding, Tensor, dict[str, float]]:
        """``encode`` and the model's full training loss from one forward pass.

        A wrapper (MHIM) trains its base with this on masked bags, so a base with more than
        a bag cross-entropy (DSMIL's instance stream, CLAM's clustering loss, MRAN's scale
        terms) keeps all of its loss. Models whose ``loss`` adds terms must override it.

        Shapes: x (B, N, D), mask (B, N), target (B,) -> Encoding, scalar, parts
        """
        enc = self.encode(x, mask)
        ce = F.cross_entropy(enc.logits, target, weight=class_weight)
        return enc, ce, {"ce": float(ce.detach())}

    # --- what trainers call --------------------------------------------------------------

    def loss_batch(
        self, batch: BagBatch, class_weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Training loss on a padded batch; override to use ``y_fine`` or ``scales``."""
        return self.loss(batch.x, batch.mask, batch.y, class_weight=class_weight)

    @torch.no_grad()
    def predict_batch(self, batch: BagBatch) -> Prediction:
        """``predict`` on a padded batch; override to use ``scales``."""
        return self.predict(batch.x, batch.mask)

    def start_training(self) -> None:
        """Called when a training run starts on the loaded weights (a ``fit`` call, one
        federated round). MHIM copies its teacher from the student here."""

    @property
    def needs_baseline_stage(self) -> bool:
        """True: local ``fit`` first trains with ``set_baseline_stage(True)`` to a selected
        model, then trains again from it (MHIM's ``teacher_init: converged``)."""
        return False

    def set_baseline_stage(self, on: bool) -> None:
        """Switch the first stage of a two-stage ``fit`` on or off."""

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] at the start of each epoch, for schedules.

        Locally it is the epoch fraction; in a federation the fraction of the planned
        rounds, so a schedule spans the whole run rather than restarting every round.
        """

    def finish_training(self) -> None:
        """Called when a ``fit`` call ends (MicroMIL hands back its reused activation buffer)."""

    def after_step(self) -> None:
        """Called after every optimiser step (MHIM's EMA teacher update)."""

