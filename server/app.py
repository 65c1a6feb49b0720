"""Flower ServerApp: read the run config, then hand the Grid to the round loop.

Run config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``config`` (path of the experiment YAML on the coordinator), ``out-dir``,
``expected-sites`` (sites to wait for before round 1), ``connect-timeout`` (seconds to
wait for them), ``resume`` (true/false) and, with node authentication, ``site-nodes`` (a
JSON object: node id -> the site name its registered key is bound to). ``flower-server
start`` writes these.

The module imports no torch and no round loop (they load when Flower calls ``main``):
Flower's simulation process loads the ServerApp and the ClientApp under one import lock
before it starts Ray, so what this module imports delays Ray's start (see client.app).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.flower_waits import HAND_OVER, hand_over_sooner
from micromil_core.config import ExperimentConfig
from micromil_core.errors import ConfigError

log = logging.getLogger("micromil.server")

# In Flower's simulation process this module is loaded before the engine starts its threads:
# the engine's hand-over loops become event-driven there (client.flower_waits); elsewhere
# (a deployed SuperLink's ServerApp) this does nothing.
hand_over_sooner()


@dataclass(frozen=True)
class ServerSettings:
    experiment: ExperimentConfig
    out: Path
    expected_sites: int
    resume: bool = False
    connect_timeout: float = 300.0
    # node id -> site name bound to its key at registration; None = names are self-declared
    # (simulation, or a coordinator without node authentication)
    site_nodes: dict[int, str] | None = None


SettingsSource = Callable[[Context], ServerSettings]


def settings_from_run_config(context: Context) -> ServerSettings:
    from micromil_core.federated.simulated_sites import experiment_from_run_config, resolve_sites

    rc = context.run_config
    experiment = experiment_from_run_config(rc)
    # Under `flwr run . local` (a data-root in the run config) every site of the root joins.
    expected = len(resolve_sites(experiment)) if rc.get("data-root") else int(rc.get("expected-sites", 2))
    return ServerSettings(
        experiment=experiment,
        out=Path(str(rc.get("out-dir", "runs/federation"))),
        expected_sites=expected,
        resume=bool(rc.get("resume", False)),
        connect_timeout=float(rc.get("connect-timeout", 300.0)),
        site_nodes=parse_site_nodes(rc.get("site-nodes")),
    )


def parse_site_nodes(value: object) -> dict[int, str] | None:
    """The run config's ``site-nodes`` JSON text as {node id: site name}; None if absent."""
    if value in (None, ""):
        return None
    try:
        raw = json.loads(str(value))
        return {int(node): str(name) for node, name in raw.items()}
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(
            f"run config site-nodes={value!r} is not a JSON object of node id -> site name; "
            "restart the run with `flower-server start`, which writes it"
        ) from None


def log_progress(out: Path) -> None:
    """Round progress to stderr (Flower streams it to `flwr log` / `flower-server start`)
    and to ``out/server.log``. Messages hold aggregates and site names only."""
    logger = logging.getLogger("micromil")
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    out.mkdir(parents=True, exist_ok=True)
    for handler in (logging.StreamHandler(), logging.FileHandler(out / "server.log")):
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def build_server_app(
    source: SettingsSource,
    results: list | None = None,
    grid_tap: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ServerApp whose settings come from ``source``; results are appended to ``results``.

    ``grid_tap`` wraps the Grid (e.g. to record every message for a privacy audit); it sees
    :class:`server.grid.PromptGrid`'s view of Flower's.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from server.federation import run_federation
        from server.grid import PromptGrid
        from server.wire_log import WIRE_LOG, WireLogGrid

        s = source(context)
        if HAND_OVER.active:  # Flower's simulation process: its engine's loops are ours
            log.info("simulation engine: messages handed over when pushed, replies when stored")
        grid = PromptGrid(grid)  # replies noticed within 0.5 s (simulation: 50 ms), not Flower's 3 s
        grid = WireLogGrid(grid, s.out / WIRE_LOG)  # what left each site, on the coordinator's disk
        if grid_tap is not None:
            grid = grid_tap(grid)
        result = run_federation(
            grid, s.experiment, s.out, s.expected_sites, resume=s.resume,
            connect_timeout=s.connect_timeout, site_nodes=s.site_nodes,
        )
        if results is not None:
            results.append(result)

    return app


def settings_for_deployment(context: Context) -> ServerSettings:
    settings = settings_from_run_config(context)
    log_progress(settings.out)
    return settings


# Deployment entry point (pyproject [tool.flwr.app.components] serverapp).
app = build_server_app(settings_for_deployment)
