"""One federated round of DP-SGD at a site: plan, budget check, training, ledger.

The plan (noise, sampling rate, steps per round) is fixed at the run's first round and
kept in the site's ledger. With a ``target_epsilon`` and no explicit noise multiplier, the
noise is calibrated so the PLANNED rounds spend exactly the budget; the site refuses a
round that would take it past the budget (and says so in its metrics the round before, so
the server stops asking).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from micromil_core.config import LocalPrivacyConfig
from micromil_core.data.bag import Bag
from micromil_core.errors import PrivacyBudgetExhausted
from micromil_core.models.base import MILModel
from micromil_core.privacy.dp_sgd import (
    DPPlan,
    PublicGradient,
    calibrate_noise,
    check_delta,
    sample_rate_for,
    state_dict_for,
    steps_per_epoch,
    train_private,
)
from micromil_core.privacy.ledger import PrivacyLedger, RunRecord

log = logging.getLogger(__name__)


def plan_run(
    ledger: PrivacyLedger, run_id: str, privacy: LocalPrivacyConfig, n_patients: int,
    batch_size: int, local_epochs: int, planned_rounds: int,
) -> RunRecord:
    """This run's DP settings: from the ledger, or fixed now on the run's first round."""
    record = ledger.run(run_id)
    if record is not None:
        return record
    rate = sample_rate_for(privacy, batch_size, n_patients)
    steps_per_round = steps_per_epoch(rate) * local_epochs
    sigma = calibrate_noise(privacy, rate, steps_per_round * planned_rounds)
    return ledger.start_run(
        run_id,
        RunRecord(
            accountant=privacy.accountant, delta=privacy.delta,
            target_epsilon=privacy.target_epsilon, noise_multiplier=sigma, sample_rate=rate,
            max_grad_norm=privacy.max_grad_norm, steps_per_round=steps_per_round,
        ),
    )


def private_train_round(
    model: MILModel,
    bags: list[Bag],
    site: str,
    privacy: LocalPrivacyConfig,
    state_dir: Path,
    run_id: str,
    server_round: int,
    planned_rounds: int,
    local_epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    public_gradient: PublicGradient | None = None,
    optimizer: str = "adam",
    momentum: float = 0.0,
    reserve_rounds: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train one round with DP-SGD; returns (weights in ``model``'s layout, metrics).
    ``reserve_rounds``: rounds after the planned ones that the noise is calibrated for too
    (a personal fine-tuning); the training schedule still spans ``planned_rounds``.

    The metrics hold only privacy settings and the spent epsilon (aggregate numbers).
    """
    check_delta(privacy, len(bags), site)
    ledger = PrivacyLedger(state_dir)
    record = plan_run(ledger, run_id, privacy, len(bags), batch_size, local_epochs,
                      planned_rounds + reserve_rounds)
    if record.would_exceed():
        raise PrivacyBudgetExhausted(
            f"site {site} has stopped contributing: another round would take its epsilon from "
            f"{record.epsilon():.2f} to {record.epsilon(record.steps_per_round):.2f}, past its "
            f"budget of {record.target_epsilon:g} (delta {record.delta:g})"
        )
    plan = DPPlan(record.noise_multiplier, record.sample_rate, record.max_grad_norm)
    trained, mean_loss = train_private(
        model, bags, plan, record.steps_per_round, lr, weight_decay, device, seed, public_gradient,
        progress=min(1.0, (server_round - 1) / max(planned_rounds, 1)), optimizer=optimizer,
        momentum=momentum,
    )
    epsilon = ledger.record_round(run_id, server_round, record.steps_per_round)
    log.info("site %s round %d: DP-SGD epsilon %.3f (delta %g)", site, server_round, epsilon, record.delta)
    metrics = {
        "train_loss": mean_loss,
        "epsilon": epsilon,
        "delta": record.delta,
        "epsilon_budget": record.target_epsilon,
        "epsilon_next": record.epsilon(record.steps_per_round),
        "noise_multiplier": record.noise_multiplier,
        "sample_rate": record.sample_rate,
        "max_grad_norm": record.max_grad_norm,
        "dp_steps": float(record.steps_per_round),
    }
    return state_dict_for(model, trained), metrics
