"""``micromil simulate`` and ``micromil compare``: a whole federation on one machine.

The same ServerApp/ClientApp code as the deployment runs under Flower's simulation
engine; only where settings come from differs (closures instead of run/node config).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from micromil_core.config import ExperimentConfig, check_model_params
from micromil_core.errors import ConfigError, SiteDataError

if TYPE_CHECKING:
    from micromil_core.federated.site_task import SiteSettings

# What this module imports at its top stays light (no torch): on the supported engine
# `simulate` starts Flower's SuperLink first, so that it comes up while this process
# imports torch and checks the sites.

log = logging.getLogger("micromil.simulate")


def _quiet_flower(out: Path) -> logging.Handler:
    """Keep Flower's own log in the run folder; the console shows our round lines."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "flower.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    flwr_logger.propagate = False
    for h in list(flwr_logger.handlers):
        if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            flwr_logger.removeHandler(h)
    return handler


def ray_backend(cfg: ExperimentConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: resources per simulated site, and the cluster to join
    (``simulation.ray_address``) instead of a private Ray instance on this machine."""
    sim = cfg.simulation
    init_args: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if sim.ray_address:
        # Every node of the cluster needs micromil-fl installed and the site folders at the
        # same paths (a shared file system); the driver ships no code.
        init_args["address"] = sim.ray_address
    return {
        "client_resources": {"num_cpus": sim.cpus_per_site, "num_gpus": sim.gpus_per_site},
        "init_args": init_args,
    }


def preflight(cfg: ExperimentConfig, sites: list[SiteSettings]) -> None:
    """The server's pre-round-1 checks, run locally before the simulation engine starts
    (same functions, so a bad site fails in seconds instead of after Ray's start-up)."""
    from micromil_core.federated.setup import experiment_spec, starting_weights
    from micromil_core.federated.site_task import describe_site
    from server.discovery import site_info
    from server.federation import check_sites

    infos = []
    for i, s in enumerate(sites):
        # Said as it happens: a site with images extracts its features here (minutes).
        log.info("pre-flight %d/%d: checking %s (%s)", i + 1, len(sites), s.name, s.role)
        infos.append(site_info(i, *describe_site(s, cfg.data)))
    classes, dim = check_sites(infos, cfg)
    log.info("pre-flight passed: %d sites, classes %s, feature dim %d", len(sites), classes, dim)
    starting_weights(cfg, experiment_spec(cfg, dim, classes), classes)


def simulate(
    cfg: ExperimentConfig,
    out: str | Path,
    resume: bool = False,
    grid_tap: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the federation in Flower's simulation engine; returns held-out metrics.

    ``resume`` continues the run saved in ``out``; ``overwrite`` starts afresh over it
    (without either, a saved run in ``out`` is an error).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage pings from a hospital run
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray starts a worker per CPU for the driver, which Flower never uses (its sites run in
    # actors, each a worker of its own): on 2 cores they only competed with the start-up.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    out = Path(out)
    if cfg.simulation.engine == "superlink":
        return _simulate_on_superlink(cfg, out, resume, overwrite, grid_tap)
    cfg, sites = _sites_of_run(cfg, out, resume, overwrite)
    preflight(cfg, sites)
    from flwr.simulation import run_simulation

    from client.flower_waits import hand_over_sooner
    from client.site_app import build_client_app, site_from_partition
    from server.app import ServerSettings, build_server_app

    results: list = []
    settings = ServerSettings(cfg, out, expected_sites=len(sites), resume=resume)
    server_app = build_server_app(lambda _ctx: settings, results, grid_tap)
    client_app = build_client_app(site_from_partition(sites))
    handler = _quiet_flower(out)
    backend = ray_backend(cfg)
    # The engine's loops, woken by the coordinator's pushes. server.app does this when it is
    # imported, but only if Flower's engine was loaded first; this process may have imported it earlier.
    hand_over_sooner()
    log.info(
        "starting Flower's simulation engine with %d sites (start-up takes 10-60 s; "
        "Flower's own log: %s)", len(sites), out / "flower.log",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app, client_app, num_supernodes=len(sites), backend_config=backend)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
        handler.close()
    if not results:
        raise SiteDataError(f"the federation ended without a result; see {out / 'flower.log'}")
    from micromil_core.report import write_report

    log.info("writing the report: %s", write_report(out))
    return results[0].metrics


def _sites_of_run(cfg: ExperimentConfig, out: Path, resume: bool,
                  overwrite: bool) -> tuple[ExperimentConfig, list[SiteSettings]]:
    """The run's sites (with the data root's declared classes), after its model name and
    params are checked; a saved run in ``out`` is removed under ``overwrite`` and refused
    without ``resume``."""
    from micromil_core.data.data_root import with_declared_classes
    from micromil_core.federated.simulated_sites import resolve_sites, with_local_privacy

    check_model_params(cfg)  # before any data is read
    if cfg.simulation.data_root:
        cfg = with_declared_classes(cfg, cfg.simulation.data_root)
    sites = with_local_privacy(resolve_sites(cfg), cfg, out)
    state_file = out / "federation-state.pt"
    if overwrite and not resume:
        from server.federation import STRATEGY_FILE

        for name in (state_file.name, STRATEGY_FILE):
            (out / name).unlink(missing_ok=True)
    if not resume and state_file.exists():
        raise ConfigError(
            f"{out} already holds a federation run; pass --resume to continue it or choose a new --out"
        )
    return cfg, sites


def _simulate_on_superlink(cfg: ExperimentConfig, out: Path, resume: bool, overwrite: bool,
                           grid_tap: Any) -> dict[str, Any]:
    """``simulate`` through ``flwr run`` on a private SuperLink (Flower's supported path)."""
    from server.simulation_superlink import PrivateSuperLink, check_engine

    if grid_tap is not None:
        raise ConfigError("a grid_tap needs simulation.engine: in-process (under `superlink` "
                          "the ServerApp runs in Flower's own process)")
    check_engine(cfg)
    # Started before anything here imports torch: it comes up (~1 s) while the sites are
    # checked, and a refused run stops it again.
    with PrivateSuperLink(out, cfg.simulation.ray_address) as link:
        cfg, sites = _sites_of_run(cfg, out, resume, overwrite)
        preflight(cfg, sites)
        metrics = link.run(cfg, len(sites), resume)
    from micromil_core.report import write_report

    log.info("writing the report: %s", write_report(out))
    return metrics


def _own_patients(cfg: ExperimentConfig, out: Path, train: list[SiteSettings]) -> dict[str, Any]:
    """Under ``federation.personalise``: every training site's local-only, global and
    personal model on that site's own test patients (``own_patients_comparison``)."""
    import json

    from micromil_core.federated.personalise import PersonalStore
    from micromil_core.federated.simulated_sites import with_local_privacy
    from micromil_core.training.compare import own_patients_comparison

    fed = out / "federated"
    run_id = json.loads((fed / "metrics.json").read_text())["personalised"]["federation_id"]
    models = {}
    for site in with_local_privacy(train, cfg, fed):  # each site's state folder, as it ran
        personal = PersonalStore(site.state_dir, run_id, site.name).model_path
        if not personal.is_file():
            raise SiteDataError(f"site {site.name} made no personal model in this run; see {fed / 'flower.log'}")
        models[site.name] = {"local": out / "local" / site.name / "model.pt",
                             "global": fed / "model.pt", "personalised": personal}
    return own_patients_comparison({s.name: s.data_path for s in train}, models, out / "own-patients", cfg.data)


def compare(cfg: ExperimentConfig, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Local-only (each site), pooled and federated models, all judged on the held-out sites;
    with ``federation.personalise`` also each training site's local-only, global and
    personal model on its own test patients (``own_patients``).

    Local and pooled models train for rounds x local_epochs epochs (the same passes over
    the data as the federation), with the usual validation-based selection. The table also
    holds ``federated_minus_pooled``: each metric's difference on the same held-out
    patients with its paired bootstrap interval (binary tasks).
    """
    from micromil_core.federated.simulated_sites import resolve_sites
    from micromil_core.io import write_json_atomic
    from micromil_core.report import PAIRED_KEY, write_report
    from micromil_core.training.compare import paired_difference
    from micromil_core.training.fitting import train_pooled
    from micromil_core.training.metrics import METRIC_KEYS
    from micromil_core.training.score import evaluate_checkpoint

    out = Path(out)
    sites = resolve_sites(cfg)
    train = [s for s in sites if s.role == "train"]
    holdout = [s.data_path for s in sites if s.role == "holdout"]
    if not holdout:
        raise ConfigError("compare needs at least one held-out site (simulation.holdout_sites)")
    epochs = cfg.federation.rounds * cfg.federation.local_epochs
    central = replace(cfg, train=replace(cfg.train, epochs=epochs))

    def judged(run: Path) -> dict[str, Any]:
        m = evaluate_checkpoint(run / "model.pt", holdout, run / "heldout", data_cfg=cfg.data)
        return {k: v for k, v in m.items() if k not in ("checkpoint", "split")}

    table: dict[str, Any] = {"local": {}}
    for site in train:
        log.info("local-only model of %s", site.name)
        train_pooled([site.data_path], central, out / "local" / site.name)
        table["local"][site.name] = judged(out / "local" / site.name)
    import time

    log.info("pooled model")
    start = time.perf_counter()
    train_pooled([s.data_path for s in train], central, out / "pooled")
    pooled_seconds = time.perf_counter() - start
    table["pooled"] = judged(out / "pooled")
    log.info("federated model")
    start = time.perf_counter()
    saved = (out / "federated" / "federation-state.pt").exists()  # an interrupted compare
    simulate(cfg, out / "federated", resume=saved and not overwrite, overwrite=overwrite)
    timing = {
        "pooled_seconds": pooled_seconds,
        "federated_seconds": time.perf_counter() - start,  # includes the engine's start-up
    }
    table["federated"] = judged(out / "federated")
    if cfg.federation.personalise != "none":
        table["own_patients"] = _own_patients(cfg, out, train)
    table["local_mean"] = {
        k: sum(m[k] for m in table["local"].values()) / len(table["local"]) for k in METRIC_KEYS
    }
    paired = paired_difference(
        out / "federated" / "heldout" / "predictions.csv", out / "pooled" / "heldout" / "predictions.csv"
    )
    if paired is not None:
        table[PAIRED_KEY] = paired
    write_json_atomic(out / "metrics.json", table)
    write_json_atomic(out / "timing.json", timing)
    write_json_atomic(out / "federated" / "compare.json", table)
    write_report(out / "federated")
    return table
