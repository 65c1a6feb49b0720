"""The site's Flower handlers: unpack the message, call micromil_core, pack an aggregate reply.

Flower loads them through the light entry point in :mod:`client.app`, which builds this
app (``build_client_app(site_from_context)``) when the first message arrives.

A site's settings come from its node config (``site-name``, ``data-path``, ``role``);
the federation's settings arrive in each message from the coordinator. Exceptions are
logged in full locally but reported to the server only by type and a redacted message,
so no patient id leaves the site even in an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import wraps
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.central_dp import central_clipping_mod
from client.packing import packing_mod
from client.secure_aggregation import secure_aggregation_mod
from micromil_core.errors import ConfigError
from micromil_core.federated import wire
from micromil_core.federated.messages import RoundSettings
from micromil_core.federated.personalise import (
    check_local_head_privacy,
    keep_local_head,
    make_personal_model,
    planned_rounds,
)
from micromil_core.federated.simulated_sites import (
    experiment_from_run_config,
    resolve_sites,
    with_local_privacy,
)
from micromil_core.federated.site_task import (
    SiteSettings,
    describe_site,
    evaluate_round,
    feature_moments,
    load_runtime,
    redact,
    train_round,
)
from micromil_core.federated.transport import narrow
from micromil_core.models.registry import load_model_code
from micromil_core.privacy.disclosure import effective_min_patients
from micromil_core.privacy.node_config import from_node_config as privacy_from_node_config
from micromil_core.runtime import resolve_device, set_threads

log = logging.getLogger("micromil.client")

SiteResolver = Callable[[Context], SiteSettings]

NODE_SITE_NAME = "site-name"
NODE_DATA_PATH = "data-path"
NODE_ROLE = "role"
NODE_STATE_DIR = "state-dir"  # the site's own folder for its privacy ledger


def site_from_node_config(context: Context) -> SiteSettings:
    """Deployment: the SuperNode was started with --node-config 'site-name=... data-path=...'."""
    cfg = context.node_config
    missing = [k for k in (NODE_SITE_NAME, NODE_DATA_PATH) if k not in cfg]
    if missing:
        raise ConfigError(
            f"node config lacks {', '.join(missing)}; start the SuperNode with "
            "--node-config 'site-name=\"h1\" data-path=\"/data/h1\" role=\"train\"'"
        )
    state_dir = cfg.get(NODE_STATE_DIR)
    return SiteSettings(
        str(cfg[NODE_SITE_NAME]),
        Path(str(cfg[NODE_DATA_PATH])),
        str(cfg.get(NODE_ROLE, "train")),
        privacy=privacy_from_node_config(cfg),
        state_dir=Path(str(state_dir)) if state_dir else None,
    )


def site_from_context(context: Context) -> SiteSettings:
    """The deployed ClientApp's site: its SuperNode's node config in a deployment; under
    Flower's own simulation (``flwr run . local``, node config ``partition-id``) the i-th
    site of the run config's ``data-root``, as ``micromil simulate`` orders them."""
    if NODE_SITE_NAME in context.node_config or "partition-id" not in context.node_config:
        return site_from_node_config(context)
    sites = _simulated_sites_of_run(context)
    i = int(context.node_config["partition-id"])
    if i >= len(sites):
        raise ConfigError(
            f"simulated node {i} has no site: the data root has {len(sites)}; run with "
            f"--federation-config 'num-supernodes={len(sites)}'"
        )
    return sites[i]


_SIMULATED_SITES: dict[tuple, list[SiteSettings]] = {}


def _simulated_sites_of_run(context: Context) -> list[SiteSettings]:
    """``simulated_sites`` of the context's run, read once per run in this process: every
    message of a run has the same run config, and reading the config and the data root
    took ~15 ms of each message (a small site's whole evaluation ~20 ms)."""
    key = (context.run_id, tuple(sorted((k, str(v)) for k, v in context.run_config.items())))
    if key not in _SIMULATED_SITES:
        _SIMULATED_SITES.clear()  # one run at a time in a simulation's process
        _SIMULATED_SITES[key] = simulated_sites(context.run_config)
    return _SIMULATED_SITES[key]


def simulated_sites(run_config: Mapping[str, Any]) -> list[SiteSettings]:
    """The sites of ``flwr run . local``, from its run config (``config``, ``data-root``,
    ``out-dir``): the same list and privacy settings as ``micromil simulate``."""
    cfg = experiment_from_run_config(run_config)
    return with_local_privacy(resolve_sites(cfg), cfg, Path(str(run_config.get("out-dir", "runs/federation"))))


def site_from_partition(sites: list[SiteSettings]) -> SiteResolver:
    """Simulation: partition-id i of the simulated SuperNodes is ``sites[i]``."""

    def resolve(context: Context) -> SiteSettings:
        return sites[int(context.node_config["partition-id"])]

    return resolve


def _private_errors(resolve: SiteResolver):
    """Log failures in full here; send only a redacted one-line reason to the server."""

    def decorate(handler):
        @wraps(handler)
        def wrapped(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as exc:
                log.exception("site handler %s failed", handler.__name__)
                try:
                    from micromil_core.data.site import load_site

                    site = resolve(context)
                    ids = [p.patient_id for p in load_site(site.data_path).patients]
                    text = redact(str(exc), ids).replace(str(site.data_path), "SITE")
                except Exception:  # the site itself may be unreadable
                    text = "see the site's log"
                raise RuntimeError(f"{type(exc).__name__}: {text}") from None

        return wrapped

    return decorate


def _settings(msg: Message) -> RoundSettings:
    return RoundSettings.from_config(msg.content.config_records[wire.CONFIG])


def _device(settings: RoundSettings) -> torch.device:
    set_threads(settings.experiment.train.num_threads)
    return resolve_device(settings.experiment.train.device)


class _SiteWork:
    """What a train, evaluate or personalise message asks of this site: the round's
    settings, the site's loaded bags, the global weights and the scaler to use."""

    def __init__(self, msg: Message, site: SiteSettings) -> None:
        self.settings = settings = _settings(msg)
        self.config = msg.content.config_records[wire.CONFIG]
        self.site = site
        self.runtime = load_runtime(site, settings.experiment.data, settings.experiment.train, settings.classes)
        self.state = msg.content.array_records[wire.ARRAYS].to_torch_state_dict()
        self.scaler = self.runtime.scaler_for(settings.scaler, settings.site_scaler)
        self.run_id = str(self.config.get(wire.FEDERATION_ID, ""))
        self.min_patients = effective_min_patients(site.privacy, settings.experiment.privacy)


def _train_reply(msg: Message, site: SiteSettings) -> Message:
    """One round of local training; under ``local-head`` the site's own head is trained
    and kept here afterwards (it is never sent)."""
    work = _SiteWork(msg, site)
    experiment, cfg = work.settings.experiment, work.config
    check_local_head_privacy(site.privacy.enabled, experiment.federation.personalise)
    server_round, device = int(cfg[wire.ROUND]), _device(work.settings)
    new_state, metrics = train_round(
        work.runtime, work.settings.spec, work.state, experiment.train, work.scaler,
        server_round=server_round,
        local_epochs=int(cfg[wire.LOCAL_EPOCHS]),
        proximal_mu=float(cfg.get(wire.PROXIMAL_MU, 0.0)),
        device=device,
        run_id=work.run_id,
        planned_rounds=experiment.federation.rounds,
        reserve_rounds=planned_rounds(experiment) - experiment.federation.rounds,
        min_patients=work.min_patients,
    )
    if experiment.federation.personalise == "local-head":
        keep_local_head(work.runtime, work.settings.spec, new_state, experiment, work.scaler,
                        server_round, int(cfg[wire.LOCAL_EPOCHS]), device, work.run_id)
    sent = narrow(new_state, experiment.federation.transport)  # float16 halves it
    content = RecordDict({wire.ARRAYS: ArrayRecord(sent), wire.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def build_client_app(resolve: SiteResolver) -> ClientApp:
    app = ClientApp(mods=[packing_mod])  # outermost: everything inside sees arrays by name
    private = _private_errors(resolve)

    @app.query()
    @private
    def describe(msg: Message, context: Context) -> Message:
        settings = _settings(msg)
        set_threads(settings.experiment.train.num_threads)  # the site's limit, for all its work
        site = resolve(context)
        description, counts = describe_site(site, settings.experiment.data)
        if isinstance(counts.get("feature_dim"), int):  # round 1 then trains without importing
            model = settings.experiment.model
            load_model_code(model.name, counts["feature_dim"], len(description[wire.SITE_CLASSES]), model.params)
        content = RecordDict({wire.SITE: ConfigRecord(description)})
        # A DP site does not release exact feature statistics: DP-SGD does not cover them.
        if site.role == "train" and counts.get("num_errors", 0) == 0 and not site.privacy.enabled:
            runtime = load_runtime(
                site, settings.experiment.data, settings.experiment.train, description[wire.SITE_CLASSES]
            )
            total, total_sq, count = feature_moments(runtime)
            content[wire.MOMENTS] = ArrayRecord({"sum": total, "sum_sq": total_sq})
            counts["num_instances"] = count
        content[wire.METRICS] = MetricRecord(counts)
        return Message(content, reply_to=msg)

    # Per handler: SecAgg+ (outermost: it masks what the handler and clipping produce),
    # then client-side clipping for central DP; both pass other train messages through.
    @app.train(mods=[secure_aggregation_mod, central_clipping_mod])
    @private
    def train(msg: Message, context: Context) -> Message:
        return _train_reply(msg, resolve(context))

    @app.evaluate()
    @private
    def evaluate(msg: Message, context: Context) -> Message:
        work = _SiteWork(msg, resolve(context))
        metrics = evaluate_round(work.runtime, work.settings.spec, work.state, work.scaler,
                                 _device(work.settings), min_patients=work.min_patients)
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.train(wire.PERSONALISE_ACTION)
    @private
    def personalise(msg: Message, context: Context) -> Message:
        """The federation's last message: make this site's personal model from the global
        one and keep it here; only aggregate, guarded numbers go back."""
        work = _SiteWork(msg, resolve(context))
        metrics = make_personal_model(work.runtime, work.settings, work.state, _device(work.settings),
                                      work.run_id, work.min_patients)
        return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app
