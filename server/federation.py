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

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from micromil_core.config import ExperimentConfig
from micromil_core.errors import SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.aggregate import scalar_keys
from micromil_core.federated.messages import RoundSettings
from micromil_core.federated.run_state import STATE_FILE, RunState, load_run_state
from micromil_core.federated.setup import (
    SiteInfo,
    check_identities,
    choose_scaler_mode,
    experiment_spec,
    global_scaler,
    run_info,
    starting_weights,
    validate_sites,
    weighted_site_metrics,
)
from micromil_core.io import write_json_atomic
from micromil_core.privacy.report import budget_stops
from micromil_core.report import metric_text
from micromil_core.training.checkpoint import (
    Checkpoint,
    file_sha256,
    save_checkpoint,
)
from server.privacy import central_dp_entry, clipping_norm, fresh_noise
from server.rounds import NodeSubset, ReplyChecks, evaluate_all, plain_train_step
from server.strategies import build_strategy, load_strategy_state, save_strategy_state

log = logging.getLogger("micromil.server")

STRATEGY_FILE = "strategy-state.npz"  # arrays + JSON manifest, never pickle
WAIT_POLL_SECONDS = 1.0




@dataclass
class FederationResult:
    rounds_done: int
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    out: Path
    sites: list[SiteInfo] = field(default_factory=list)






# ------------------------------------------------------------------ discovery


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= expected:
            return ids
        if time.monotonic() > deadline:
            raise SiteDataError(
                f"only {len(ids)} of {expected} sites connected within {timeout:.0f} s; "
                "check that every site's client is running and can reach the server"
            )
        time.sleep(WAIT_POLL_SECONDS)


def site_info(
    node_id: int,
    description: Any,
    counts: dict[str, int],
    moments: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> SiteInfo:
    """A SiteInfo from a site's description record (see ``describe_site``)."""
    return SiteInfo(
        node_id,
        str(description[wire.SITE_NAME]),
        str(description[wire.SITE_ROLE]),
        [str(x) for x in description.get(wire.SITE_CLASSES, [])],
        counts,
        [str(x) for x in description.get(wire.SITE_PROBLEMS, [])],
        moments,
    )


def discover_sites(grid: Grid, settings: RoundSettings, expected: int, timeout: float) -> list[SiteInfo]:
    """Ask every site to describe itself (aggregate counts only) and send feature moments."""
    ids = wait_for_nodes(grid, expected, timeout)
    config = ConfigRecord(settings.to_config())
    messages = [
        Message(RecordDict({wire.CONFIG: config}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sites: list[SiteInfo] = []
    failed = []
    for reply in replies:
        if reply.has_error():
            failed.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        c = reply.content
        counts = {k: int(v) for k, v in c.metric_records[wire.METRICS].items()}
        moments = None
        if wire.MOMENTS in c.array_records:
            arr = c.array_records[wire.MOMENTS]
            moments = (
                torch.from_numpy(arr["sum"].numpy()).double(),
                torch.from_numpy(arr["sum_sq"].numpy()).double(),
                counts.get("num_instances", 0),
            )
        sites.append(site_info(reply.metadata.src_node_id, c.config_records[wire.SITE], counts, moments))
    if failed:
        raise SiteDataError("sites failed their pre-flight check: " + "; ".join(failed))
    return sorted(sites, key=lambda s: s.name)


















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
    return classes, dim


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
    fed = cfg.federation
    settings = RoundSettings(cfg, classes=[])
    sites = discover_sites(grid, settings, expected_sites, connect_timeout)
    check_identities(sites, site_nodes)
    classes, dim = check_sites(sites, cfg)
    train_sites = [s for s in sites if s.role == "train"]
    holdout = [s for s in sites if s.role == "holdout"]
    log.info(
        "sites: train %s; held out %s; classes %s; feature dim %d",
        [s.name for s in train_sites], [s.name for s in holdout], classes, dim,
    )
    from server.secure_aggregation import secure_train_step

    spec = experiment_spec(cfg, dim, classes)
    scaler_mode = choose_scaler_mode(cfg, train_sites)
    scaler = global_scaler(sites, dim) if scaler_mode == "global" else None
    settings = RoundSettings(cfg, classes, spec, scaler, site_scaler=scaler_mode == "site")

    strategy = build_strategy(fed, len(train_sites), cfg.privacy)
    central = cfg.privacy.central
    # SecAgg+ scales each site's model by patients / max_weight before quantisation.
    patients = sum(s.counts.get(wire.NUM_EXAMPLES, 0) for s in train_sites)
    state_path, strategy_path = out / STATE_FILE, out / STRATEGY_FILE
    state = load_run_state(state_path, cfg, spec) if resume else None
    if state is None:
        init = starting_weights(cfg, spec, classes)
        state = RunState(0, init, [], 0, init, math.inf)
    else:
        load_strategy_state(strategy, strategy_path)
        log.info("resuming after round %d", state.round)
    arrays = ArrayRecord(state.arrays)
    name_of = {s.node_id: s.name for s in sites}
    checks = ReplyChecks(
        fed.max_update_ratio, {s.name: int(s.counts.get(wire.NUM_EXAMPLES, 0)) for s in sites}
    )
    extra = {"experiment": cfg.to_dict(), "spec": [spec.name, spec.in_dim, spec.n_classes]}

    missing: set[str] = set()  # training sites that failed a round and have not replied since
    stopped = budget_stops(state.history)  # sites out of privacy budget: never asked again
    for rnd in range(state.round + 1, fed.rounds + 1):
        start = time.perf_counter()
        active = [s for s in train_sites if s.name not in stopped]
        if not active:
            log.warning(
                "every training site has spent its privacy budget; the federation ends after round %d",
                state.round,
            )
            break
        train_view = NodeSubset(grid, [s.node_id for s in active])
        round_config = ConfigRecord({
            **settings.to_config(), wire.ROUND: rnd, wire.LOCAL_EPOCHS: fed.local_epochs,
            wire.FEDERATION_ID: state.federation_id,
        })
        min_sites = min(fed.min_train_sites or len(train_sites), len(active))
        if len(active) < len(train_sites):
            limit_sampling(strategy, min_sites)  # else Flower waits for the stopped sites
        if central.enabled:
            fresh_noise()
            norm_clipped = clipping_norm(strategy)  # adaptive clipping moves it in aggregation
        args = (grid, strategy, rnd, arrays, round_config, train_view, name_of, fed.round_timeout,
                min_sites, checks)
        step = (
            secure_train_step(*args, cfg.privacy.secagg, max_weight=max(patients, 1))
            if cfg.privacy.secure_aggregation
            else plain_train_step(*args)
        )
        failures = step.failures
        for site, message in budget_stops([{"train": step.per_site}]).items():
            if site not in stopped and rnd < fed.rounds:
                log.warning("round %d: %s", rnd, message)
            stopped.setdefault(site, message)
        trained = set(step.per_site)
        if missing & trained:
            log.info("round %d: %s back and training again", rnd, ", ".join(sorted(missing & trained)))
        missing = (missing | step.asked) - trained
        if step.arrays is not None:
            arrays = step.arrays
        else:
            failures.append(
                f"round {rnd}: {len(step.per_site)} of {min_sites} required sites replied; global model kept"
            )
        for f in failures:
            log.warning("round %d: %s", rnd, f)
        eval_results, eval_failures, eval_sent, eval_received, eval_rejected = evaluate_all(
            grid, sites, arrays, round_config, rnd, fed.round_timeout, checks
        )
        for f in eval_failures:  # the evaluation phase's own failures, named like training's
            log.warning("round %d: %s", rnd, f)
        failures += eval_failures
        train_eval = {k: v for k, v in eval_results.items() if k in {s.name for s in train_sites}}
        holdout_eval = {k: v for k, v in eval_results.items() if k in {s.name for s in holdout}}
        entry = {
            "round": rnd,
            "wall_seconds": time.perf_counter() - start,
            "bytes_sent": step.sent + eval_sent,
            "bytes_received": step.received + eval_received,
            "train": step.per_site,
            "train_aggregated": weighted_site_metrics(step.per_site, scalar_keys(step.per_site.values())),
            "evaluate": train_eval,
            "evaluate_aggregated": weighted_site_metrics(train_eval, (*wire.CORE_METRICS, "loss")),
            "holdout": holdout_eval,
            "holdout_aggregated": weighted_site_metrics(holdout_eval, (*wire.CORE_METRICS, "loss")),
            "failures": failures,
            # replies refused before use: {"train"|"evaluate": {site: why}}
            "rejected": {"train": step.rejected, "evaluate": eval_rejected},
            "stopped_for_privacy": sorted(stopped),
        }
        if central.enabled:
            entry["central_dp"] = central_dp_entry(
                strategy, central, norm_clipped, step.per_site, step.arrays is not None, state.history
            )
        state.history.append(entry)
        state.round = rnd
        state.arrays = arrays.to_torch_state_dict()
        val_loss = entry["evaluate_aggregated"].get("loss", math.nan)
        if math.isfinite(val_loss) and val_loss < state.best_val_loss:
            state.best_round, state.best_val_loss, state.best_arrays = rnd, val_loss, state.arrays
        save_strategy_state(strategy, strategy_path)
        state.save(state_path, extra)
        write_json_atomic(out / "history.json", {"run": run_info(cfg, sites), "rounds": state.history})
        log.info(
            "round %d/%d: train loss %s | val AUC %s | held-out AUC %s | %.1f s",
            rnd, fed.rounds,
            metric_text(entry["train_aggregated"], "train_loss"),
            metric_text(entry["evaluate_aggregated"], "auc"),
            metric_text(entry["holdout_aggregated"], "auc"),
            entry["wall_seconds"],
        )

    if fed.select == "best-val" and state.best_round:
        chosen, final_arrays = state.best_round, state.best_arrays
    else:
        if fed.select == "best-val":
            log.warning(
                "federation.select=best-val found no aggregated validation loss in any round "
                "(the training sites' validation sets are smaller than the small-count guard's "
                "threshold, or none replied); the last round's model is kept"
            )
        chosen, final_arrays = state.round, state.arrays
    entry = next((h for h in state.history if h["round"] == chosen), {})
    holdout = entry.get("holdout", {})
    metrics = {
        **entry.get("holdout_aggregated", {}),
        "n": int(sum(m.get(wire.NUM_EXAMPLES, 0) for m in holdout.values())),
        "per_site": {
            site: {k: v for k, v in m.items() if not k.startswith("roc_")}
            for site, m in holdout.items()
        },
        "round": chosen,
        "selected_by": fed.select,
    }
    save_checkpoint(
        Checkpoint(
            model_name=spec.name, in_dim=spec.in_dim, n_classes=spec.n_classes, params=spec.params,
            classes=classes, state_dict=final_arrays, scaler=scaler, encoder=cfg.data.encoder,
            config=cfg.to_dict(),
            provenance={"round": chosen, "federated": True, "strategy": fed.strategy,
                        "trained_on": [s.name for s in train_sites], "scaler": scaler_mode},
        ),
        out / "model.pt",
    )
    # Hospitals that receive model.pt check it against this (`micromil inspect model.pt`).
    metrics["model_sha256"] = file_sha256(out / "model.pt")
    log.info("global model %s (round %d), sha256 %s", out / "model.pt", chosen, metrics["model_sha256"])
    write_json_atomic(out / "metrics.json", metrics)
    return FederationResult(state.round, state.history, metrics, out, sites)



