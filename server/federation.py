"""The federation's round loop over a Flower Grid: discover and check the sites, then
train, aggregate, evaluate and checkpoint every round.

The loop calls the Flower strategy's own ``configure_train``/``aggregate_train`` so any
strategy (and Flower's DP wrappers) works unchanged, while this module adds what a
hospital federation needs: only training sites train, held-out sites only evaluate,
replies are aggregated in a fixed (site name) order so a seed reproduces the model,
every round is checkpointed atomically, and ``resume`` continues after the last one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from micromil_core.config import ExperimentConfig
from micromil_core.federated import wire
from micromil_core.federated.aggregate import scalar_keys
from micromil_core.federated.history import RoundRecord, RunHistory
from micromil_core.federated.messages import RoundSettings
from micromil_core.federated.run_state import STATE_FILE, RunState, load_run_state
from micromil_core.federated.setup import (
    SiteInfo,
    check_identities,
    choose_scaler_mode,
    experiment_spec,
    federated_checkpoint,
    global_scaler,
    run_info,
    starting_weights,
    validate_sites,
    weighted_site_metrics,
)
from micromil_core.federated.site_task import ModelSpec
from micromil_core.io import write_json_atomic
from micromil_core.privacy.report import budget_stops
from micromil_core.report import metric_text
from micromil_core.tracking import log_outputs, open_tracker, round_metrics
from micromil_core.training.checkpoint import (
    file_sha256,
    save_checkpoint,
)
from server.discovery import discover_sites
from server.privacy import central_dp_entry, clipping_norm, fresh_noise
from server.rounds import NodeSubset, ReplyChecks, TrainStep, evaluate_all, plain_train_step
from server.strategies import build_strategy, load_strategy_state, save_strategy_state

log = logging.getLogger("micromil.server")

STRATEGY_FILE = "strategy-state.npz"  # arrays + JSON manifest, never pickle


@dataclass
class FederationResult:
    rounds_done: int
    history: list[RoundRecord]
    metrics: dict[str, Any]
    out: Path
    sites: list[SiteInfo] = field(default_factory=list)


# ------------------------------------------------------------------ rounds


def limit_sampling(strategy: Any, n: int) -> None:
    """Let the strategy (and the one a DP wrapper wraps) sample from ``n`` sites."""
    for s in (strategy, getattr(strategy, "strategy", None)):
        for attr in ("min_train_nodes", "min_available_nodes"):
            if s is not None and getattr(s, attr, 0) > n:
                setattr(s, attr, n)


def check_sites(sites: list[SiteInfo], cfg: ExperimentConfig) -> tuple[list[str], int]:
    """The sites' data (``validate_sites``), then the strategy and privacy settings against
    the number of training sites; returns (classes, feature dim)."""
    classes, dim = validate_sites(sites, cfg)
    build_strategy(cfg.federation, sum(s.role == "train" for s in sites), cfg.privacy)
    # Said before round 1, not by each DP site in every round: local-head trains outside DP.
    dp_sites = [s.name for s in sites if s.role == "train" and s.privacy != "none"]
    if cfg.privacy.local.enabled or dp_sites:
        from micromil_core.federated.personalise import check_local_head_privacy

        check_local_head_privacy(True, cfg.federation.personalise, dp_sites)
    return classes, dim


@dataclass
class _Federation:
    """What every round of one run needs, fixed once the sites have been checked."""

    grid: Grid
    cfg: ExperimentConfig
    out: Path
    sites: list[SiteInfo]
    classes: list[str]
    spec: ModelSpec
    scaler: Any
    scaler_mode: str
    settings: RoundSettings
    strategy: Any
    checks: ReplyChecks

    @property
    def train_sites(self) -> list[SiteInfo]:
        return [s for s in self.sites if s.role == "train"]

    @property
    def holdout(self) -> list[SiteInfo]:
        return [s for s in self.sites if s.role == "holdout"]


def _set_up(
    grid: Grid, cfg: ExperimentConfig, out: Path, expected_sites: int, connect_timeout: float,
    site_nodes: dict[int, str] | None,
) -> _Federation:
    """Discover the sites, check who they are and what they hold, and fix the round settings."""
    sites = discover_sites(grid, RoundSettings(cfg, classes=[]), expected_sites, connect_timeout, site_nodes)
    check_identities(sites, site_nodes)
    classes, dim = check_sites(sites, cfg)
    train_sites = [s for s in sites if s.role == "train"]
    log.info(
        "sites: train %s; held out %s; classes %s; feature dim %d",
        [s.name for s in train_sites], [s.name for s in sites if s.role == "holdout"], classes, dim,
    )
    spec = experiment_spec(cfg, dim, classes)
    scaler_mode = choose_scaler_mode(cfg, train_sites)
    scaler = global_scaler(sites, dim) if scaler_mode == "global" else None
    checks = ReplyChecks(
        cfg.federation.max_update_ratio,
        {s.name: int(s.counts.get(wire.NUM_EXAMPLES, 0)) for s in sites},
        cfg.federation.transport,
    )
    return _Federation(
        grid, cfg, out, sites, classes, spec, scaler, scaler_mode,
        RoundSettings(cfg, classes, spec, scaler, site_scaler=scaler_mode == "site"),
        build_strategy(cfg.federation, len(train_sites), cfg.privacy), checks,
    )


def _start_state(fed: _Federation, resume: bool) -> RunState:
    state = load_run_state(fed.out / STATE_FILE, fed.cfg, fed.spec) if resume else None
    if state is None:
        init = starting_weights(fed.cfg, fed.spec, fed.classes)
        return RunState(0, init, [], 0, init, math.inf)
    load_strategy_state(fed.strategy, fed.out / STRATEGY_FILE)
    log.info("resuming after round %d", state.round)
    return state


def _train(fed: _Federation, rnd: int, arrays: ArrayRecord, round_config: ConfigRecord,
           active: list[SiteInfo]) -> tuple[TrainStep, int]:
    """The training half of round ``rnd`` on the ``active`` sites; returns it and how many
    replies it needed."""
    from server.secure_aggregation import secure_train_step

    train_sites = fed.train_sites
    min_sites = min(fed.cfg.federation.min_train_sites or len(train_sites), len(active))
    if len(active) < len(train_sites):
        limit_sampling(fed.strategy, min_sites)  # else Flower waits for the stopped sites
    name_of = {s.node_id: s.name for s in fed.sites}
    args = (fed.grid, fed.strategy, rnd, arrays, round_config,
            NodeSubset(fed.grid, [s.node_id for s in active]), name_of,
            fed.cfg.federation.round_timeout, min_sites, fed.checks)
    if not fed.cfg.privacy.secure_aggregation:
        return plain_train_step(*args), min_sites
    # SecAgg+ scales each site's model by patients / max_weight before quantisation.
    patients = sum(s.counts.get(wire.NUM_EXAMPLES, 0) for s in train_sites)
    return secure_train_step(*args, fed.cfg.privacy.secagg, max_weight=max(patients, 1)), min_sites


def _play_round(
    fed: _Federation, state: RunState, rnd: int, arrays: ArrayRecord, stopped: dict[str, str],
) -> tuple[RoundRecord, TrainStep]:
    """Train, aggregate and evaluate round ``rnd``; ``stopped`` gains the sites whose
    privacy budget this round used up."""
    start = time.perf_counter()
    active = [s for s in fed.train_sites if s.name not in stopped]
    round_config = ConfigRecord({
        **fed.settings.to_config(), wire.ROUND: rnd, wire.LOCAL_EPOCHS: fed.cfg.federation.local_epochs,
        wire.FEDERATION_ID: state.federation_id,
    })
    central = fed.cfg.privacy.central
    if central.enabled:
        fresh_noise()
        norm_clipped = clipping_norm(fed.strategy)  # adaptive clipping moves it in aggregation
    step, min_sites = _train(fed, rnd, arrays, round_config, active)
    for site, message in budget_stops([step.per_site]).items():
        if site not in stopped and rnd < fed.cfg.federation.rounds:
            log.warning("round %d: %s", rnd, message)
        stopped.setdefault(site, message)
    failures = list(step.failures)
    if step.arrays is None:
        failures.append(
            f"round {rnd}: {len(step.per_site)} of {min_sites} required sites replied; global model kept"
        )
    for f in failures:
        log.warning("round %d: %s", rnd, f)
    evaluated = step.arrays if step.arrays is not None else arrays
    eval_results, eval_failures, eval_sent, eval_received, eval_rejected = evaluate_all(
        fed.grid, fed.sites, evaluated, round_config, rnd, fed.cfg.federation.round_timeout, fed.checks
    )
    for f in eval_failures:  # the evaluation phase's own failures, named like training's
        log.warning("round %d: %s", rnd, f)
    train_names, holdout_names = {s.name for s in fed.train_sites}, {s.name for s in fed.holdout}
    train_eval = {k: v for k, v in eval_results.items() if k in train_names}
    holdout_eval = {k: v for k, v in eval_results.items() if k in holdout_names}
    record = RoundRecord(
        round=rnd,
        wall_seconds=time.perf_counter() - start,
        bytes_sent=step.sent + eval_sent,
        bytes_received=step.received + eval_received,
        train=step.per_site,
        train_aggregated=weighted_site_metrics(step.per_site, scalar_keys(step.per_site.values())),
        evaluate=train_eval,
        evaluate_aggregated=weighted_site_metrics(train_eval, (*wire.CORE_METRICS, "loss")),
        holdout=holdout_eval,
        holdout_aggregated=weighted_site_metrics(holdout_eval, (*wire.CORE_METRICS, "loss")),
        failures=failures + eval_failures,
        rejected={"train": step.rejected, "evaluate": eval_rejected},
        stopped_for_privacy=sorted(stopped),
    )
    if central.enabled:
        record.central_dp = central_dp_entry(
            fed.strategy, central, norm_clipped, step.per_site, step.arrays is not None, state.history
        )
    return record, step


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    out: Path,
    expected_sites: int,
    resume: bool = False,
    connect_timeout: float = 300.0,
    site_nodes: dict[int, str] | None = None,
) -> FederationResult:
    """Run (or resume) the whole federation; writes model.pt, history.json, metrics.json.

    ``site_nodes`` (node id -> registered site name) binds each node to the site its key
    was registered for; without it (simulation, no node authentication) names are trusted.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open_tracker(cfg, out, "federation") as tracker:  # a no-op unless tracking is on
        fed = _set_up(grid, cfg, out, expected_sites, connect_timeout, site_nodes)
        state = _start_state(fed, resume)
        arrays = ArrayRecord(state.arrays)
        info = run_info(cfg, fed.sites, state.started)
        missing: set[str] = set()  # training sites that failed a round and have not replied since
        # Sites out of privacy budget: never asked again.
        stopped = budget_stops(r.train for r in state.history)
        for rnd in range(state.round + 1, cfg.federation.rounds + 1):
            if all(s.name in stopped for s in fed.train_sites):
                log.warning(
                    "every training site has spent its privacy budget; the federation ends after round %d",
                    state.round,
                )
                break
            record, step = _play_round(fed, state, rnd, arrays, stopped)
            trained = set(step.per_site)
            if missing & trained:
                log.info("round %d: %s back and training again", rnd, ", ".join(sorted(missing & trained)))
            missing = (missing | step.asked) - trained
            if step.arrays is not None:
                arrays = step.arrays
            state.history.append(record)
            state.round = rnd
            state.arrays = arrays.to_torch_state_dict()
            if math.isfinite(record.validation_loss) and record.validation_loss < state.best_val_loss:
                state.best_round, state.best_val_loss, state.best_arrays = rnd, record.validation_loss, state.arrays
            save_strategy_state(fed.strategy, out / STRATEGY_FILE)
            state.save(out / STATE_FILE, {"experiment": cfg.to_dict(),
                                          "spec": [fed.spec.name, fed.spec.in_dim, fed.spec.n_classes]})
            RunHistory(info, state.history).write(out)
            tracker.log_metrics(rnd, round_metrics(record))
            log.info(
                "round %d/%d: train loss %s | val AUC %s | held-out AUC %s | %.1f s",
                rnd, cfg.federation.rounds,
                metric_text(record.train_aggregated, "train_loss"),
                metric_text(record.evaluate_aggregated, "auc"),
                metric_text(record.holdout_aggregated, "auc"),
                record.wall_seconds,
            )
        result = _finish(fed, state)
        log_outputs(tracker, out)
    return result


def _finish(fed: _Federation, state: RunState) -> FederationResult:
    """Choose the final model (``federation.select``), save it and its held-out metrics."""
    select = fed.cfg.federation.select
    if select == "best-val" and state.best_round:
        chosen, final_arrays = state.best_round, state.best_arrays
    else:
        if select == "best-val":
            log.warning(
                "federation.select=best-val found no aggregated validation loss in any round "
                "(the training sites' validation sets are smaller than the small-count guard's "
                "threshold, or none replied); the last round's model is kept"
            )
        chosen, final_arrays = state.round, state.arrays
    record = next((r for r in state.history if r.round == chosen), RoundRecord(chosen))
    metrics = {
        **record.holdout_aggregated,
        "n": int(sum(m.get(wire.NUM_EXAMPLES, 0) for m in record.holdout.values())),
        "per_site": {
            site: {k: v for k, v in m.items() if not k.startswith("roc_")}
            for site, m in record.holdout.items()
        },
        "round": chosen,
        "selected_by": select,
    }
    spec, model_path = fed.spec, fed.out / "model.pt"
    save_checkpoint(
        federated_checkpoint(
            fed.cfg, spec, fed.classes, final_arrays, fed.scaler,
            {"round": chosen, "federated": True, "strategy": fed.cfg.federation.strategy,
             "trained_on": [s.name for s in fed.train_sites], "scaler": fed.scaler_mode,
             # the sites' common encoder (validate_sites refused any mismatch)
             "encoder_identity": next((s.encoder for s in fed.train_sites if s.encoder), None)},
        ),
        model_path,
    )
    # Hospitals that receive model.pt check it against this (`micromil inspect model.pt`).
    metrics["model_sha256"] = file_sha256(model_path)
    log.info("global model %s (round %d), sha256 %s", model_path, chosen, metrics["model_sha256"])
    write_json_atomic(fed.out / "metrics.json", metrics)  # the federation's result stands first
    if fed.cfg.federation.personalise != "none":
        from server.personalisation import personalise_sites

        try:
            metrics["personalised"] = personalise_sites(fed, ArrayRecord(final_arrays), state.federation_id)
        except Exception as exc:  # the global model is saved; say why the personal step failed
            log.exception("personalisation failed")
            metrics["personalised"] = {"method": fed.cfg.federation.personalise,
                                       "federation_id": state.federation_id, "per_site": {},
                                       "failures": [f"{type(exc).__name__}: {exc}"]}
        write_json_atomic(fed.out / "metrics.json", metrics)
    return FederationResult(state.round, state.history, metrics, fed.out, fed.sites)
