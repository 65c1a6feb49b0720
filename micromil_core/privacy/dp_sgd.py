"""DP-SGD at a site with one PATIENT (one bag) as the privacy unit, on Opacus.

Each step samples patients independently with probability q (Poisson sampling, which the
accountant assumes), computes one gradient per patient with Opacus's GradSampleModule on
the dense padded batch, clips each to ``max_grad_norm`` (C), sums them, adds Gaussian
noise of standard deviation ``noise_multiplier * C`` and divides by the expected batch
size q*n. A step whose sample is empty still adds noise, as the analysis requires.

Two things are left out of the per-patient loss on purpose, because they would make one
patient's gradient depend on the others (and so break the C bound on a patient's
influence): the weighted-mean normalisation of the class-weighted loss, and class weights
computed from the site's label counts. Under DP the loss is the plain mean over patients.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from micromil_core.config import LocalPrivacyConfig
from micromil_core.data.bag import Bag, collate_bags
from micromil_core.errors import ConfigError, TrainingError
from micromil_core.models.base import MILModel

log = logging.getLogger(__name__)

# Gradient of a term that depends only on the parameters and public values (FedProx's
# proximal term): added after clipping and noise, it costs no privacy.
PublicGradient = Callable[[MILModel], None]


@dataclass(frozen=True)
class DPPlan:
    """DP-SGD settings: noise sigma, Poisson rate q, per-patient clipping bound C."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float


def sample_rate_for(privacy: LocalPrivacyConfig, batch_size: int, n_patients: int) -> float:
    """Poisson sampling rate q: the configured one, or batch_size / n (capped at 1)."""
    if n_patients < 1:
        raise ConfigError("DP-SGD needs at least one training patient at the site")
    return privacy.sample_rate or min(1.0, batch_size / n_patients)


def steps_per_epoch(sample_rate: float) -> int:
    """Steps that see every patient once in expectation: round(1 / q)."""
    return max(1, round(1.0 / sample_rate))


def check_delta(privacy: LocalPrivacyConfig, n_patients: int, site: str) -> None:
    """delta must be well below 1/n: at 1/n, 'leak one patient's record' is within budget."""
    if privacy.delta >= 1.0 / max(n_patients, 1):
        raise ConfigError(
            f"site {site}: privacy.delta={privacy.delta:g} is not below 1/{n_patients} "
            f"(1 / training patients = {1.0 / max(n_patients, 1):.3g}); a delta that large "
            f"allows one patient's data to leak. Use e.g. delta: {_suggest_delta(n_patients):g}"
        )


def _suggest_delta(n: int) -> float:
    return 10.0 ** math.floor(math.log10(0.1 / max(n, 1)))


def calibrate_noise(privacy: LocalPrivacyConfig, sample_rate: float, total_steps: int) -> float:
    """The noise multiplier that spends exactly ``target_epsilon`` over ``total_steps``."""
    if privacy.noise_multiplier > 0:
        return privacy.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order")  # valid, not the tightest
        try:
            sigma = get_noise_multiplier(
                target_epsilon=privacy.target_epsilon,
                target_delta=privacy.delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=privacy.accountant,
            )
        except ValueError as exc:
            raise ConfigError(
                f"privacy.target_epsilon={privacy.target_epsilon:g} cannot be reached with "
                f"{total_steps} steps at sampling rate {sample_rate:.3g} ({exc}); raise the "
                "budget or train fewer rounds/epochs"
            ) from None
    return float(sigma)


def _with_dense_gnn(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every MicroMIL inside it on the dense GAT backend (Opacus cannot take
    per-sample gradients through PyG's scatter-based GATConv). Copies what it changes."""
    from micromil_core.models.micromil import MicroMIL, switch_gnn_backend

    if isinstance(model, MicroMIL):
        return model if model.params.gnn_backend == "dense" else switch_gnn_backend(model, "dense")
    changed = {name: _with_dense_gnn(child) for name, child in model.named_children()}
    changed = {name: new for name, new in changed.items() if new is not getattr(model, name)}
    if not changed:
        return model
    model = copy.deepcopy(model)  # a wrapper (e.g. MHIM around MicroMIL): swap its parts
    for name, new in changed.items():
        setattr(model, name, new)
    return model


def make_private_model(model: MILModel) -> MILModel:
    """A copy Opacus can take per-patient gradients of (MicroMIL: the dense GAT backend).

    The copy has identical weights; ``state_dict_for`` maps them back to the original layout.
    """
    from opacus.validators import ModuleValidator

    if model.couples_bags:
        raise ConfigError(
            f"model {type(model).__name__} couples the patients of a batch in its loss, so "
            "DP-SGD cannot bound one patient's influence; choose another model or "
            "privacy.mode: none"
        )
    model = _with_dense_gnn(model)
    model.train()  # Opacus validates (and DP-SGD trains) in training mode
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(
            f"model {type(model).__name__} cannot be trained with DP-SGD: "
            f"{'; '.join(str(e) for e in errors[:3])}; choose another model or privacy.mode: none"
        )
    return model


def state_dict_for(original: MILModel, trained: MILModel) -> dict[str, Tensor]:
    """The trained weights in ``original``'s parameter layout."""
    from micromil_core.nn.gat import convert_gat_state

    state = {k: v.detach().cpu() for k, v in trained.state_dict().items()}
    if any(k.endswith(".att_src") for k in original.state_dict()):  # PyG GAT layers
        state = convert_gat_state(state, "pyg")
    return state


def dp_optimizer(model: MILModel, plan: DPPlan, lr: float, weight_decay: float, n_patients: int,
                 generator: torch.Generator | None = None, optimizer: str = "adam",
                 momentum: float = 0.0):
    """Opacus's DPOptimizer around Adam or SGD, averaging by the EXPECTED batch size q*n."""
    from opacus.optimizers import DPOptimizer

    from micromil_core.training.trainer import build_optimizer

    inner = build_optimizer(model.parameters(), optimizer, lr, weight_decay, momentum)
    return DPOptimizer(
        inner,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=max(1, round(plan.sample_rate * n_patients)),
        loss_reduction="mean",
        generator=generator,
    )


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Indices of the patients in this step: each one independently with probability rate."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


def train_private(
    model: MILModel,
    bags: list[Bag],
    plan: DPPlan,
    steps: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    seed: int,
    public_gradient: PublicGradient | None = None,
    progress: float = 0.0,
    optimizer: str = "adam",
    momentum: float = 0.0,
) -> tuple[MILModel, float]:
    """Run ``steps`` DP-SGD steps on ``bags``.

    Returns (the trained model in the DP-compatible layout, mean loss per sampled
    patient). Use ``state_dict_for`` to get the weights in the original layout.
    """
    from opacus import GradSampleModule

    private = make_private_model(model).to(device)
    private.train()
    gsm = GradSampleModule(private, loss_reduction="mean")
    generator = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    dp_opt = dp_optimizer(
        private, plan, lr, weight_decay, len(bags), noise_gen, optimizer, momentum
    )
    private.start_training()
    private.set_progress(progress)
    total_loss, seen = 0.0, 0
    for _ in range(steps):
        dp_opt.zero_grad(set_to_none=True)
        chosen = poisson_sample(len(bags), plan.sample_rate, generator)
        if chosen:
            batch = collate_bags([bags[i] for i in chosen]).to(device)
            # gsm._module.loss: GradSampleModule does not forward method calls, but its
            # hooks sit on the submodules, so the per-patient gradients are recorded.
            loss, _ = gsm._module.loss_batch(batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"DP training loss became {float(loss)}; lower train.lr")
            with warnings.catch_warnings():
                # Opacus's hooks fire on module outputs when the inputs need no gradient.
                warnings.filterwarnings("ignore", message="Full backward hook")
                loss.backward()
            total_loss += float(loss.detach()) * len(chosen)
            seen += len(chosen)
        else:
            mark_empty_step(private)
        if dp_opt.pre_step():
            if public_gradient is not None:
                public_gradient(private)
            dp_opt.original_optimizer.step()
            private.after_step()
    gsm._close()
    return private, total_loss / max(seen, 1)


def mark_empty_step(model: torch.nn.Module) -> None:
    """An empty Poisson sample: zero per-patient gradients, so the step is noise only."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
