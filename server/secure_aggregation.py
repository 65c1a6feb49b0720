"""One round's training through Flower's SecAgg+ workflow (Bell et al. 2020): the server
only ever sees the sum of the sites' quantised, masked models, plus each site's aggregate
train metrics (loss, patient count, local-DP epsilon), which travel unmasked.

Flower 1.41 runs SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` takes the round
and the model from a ``LegacyContext``'s state and asks the context's legacy strategy
which sites get which ``FitIns`` (``configure_fit``), then hands it the replies with every
site's arrays replaced by the unmasked weighted mean (``aggregate_fit``). Here a small
legacy strategy serves the messages that our (message-API) strategy configured and keeps
that mean; our strategy then aggregates stand-in replies that each carry the mean and the
site's metrics. Its weighted average of identical arrays is the mean itself, so FedProx's
mu, a client-side central-DP wrapper (noise, adaptive norm) and server optimisers work as
on the plain path; medians and Krum need each update and are refused at build time.

Weights: each site scales its model by ``patients / max_weight`` before quantisation and
the server divides the sum by the summed (quantised) scales, so the result is the same
patient-weighted mean as the plain path up to quantisation: per element at most about
``n_sites * 2 * clipping_range / quantization_range / sum(scales)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from micromil_core.config import SecureAggregationConfig
from micromil_core.federated import wire
from micromil_core.federated.validation import metrics_problem, update_problem
from server.privacy import secagg_workflow
from server.rounds import (
    NodeSubset,
    ReplyChecks,
    TrainStep,
    for_strategy,
    match_replies,
    metric_dict,
    payload_bytes,
)

FITRES_METRICS = "fitres.metrics"  # Flower's legacy record name
COLLECT_STAGE = "collect_masked_vectors"  # the stage in which sites train


def to_fitins(content: RecordDict) -> FitIns:
    """Our train message as a legacy FitIns; the array names travel in the config."""
    arrays = content.array_records[wire.ARRAYS]
    config = dict(content.config_records[wire.CONFIG])
    config[wire.ARRAY_KEYS] = list(arrays.keys())
    return FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), config)


class _ConfiguredFit(LegacyStrategy):
    """The legacy strategy the workflow drives: serves the FitIns our strategy
    configured and keeps the replies the workflow unmasked (nothing else is used)."""

    def __init__(self, grid: Grid, fitins: dict[int, FitIns]) -> None:
        self.grid, self.fitins = grid, fitins
        self.results: list[tuple[Any, Any]] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(nid, self.grid, 0), ins) for nid, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}  # the round loop, not the workflow, updates the global model

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _StageLog:
    """A Grid view that keeps each protocol stage's messages and replies."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.stages: list[tuple[str, list[Message], list[Message]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.stages.append((stage, messages, replies))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def secure_train_step(
    grid: Grid, strategy: Any, rnd: int, arrays: ArrayRecord, config: ConfigRecord,
    train_view: NodeSubset, name_of: dict[int, str], timeout: float, min_sites: int,
    checks: ReplyChecks, secagg: SecureAggregationConfig, max_weight: float,
) -> TrainStep:
    """``plain_train_step`` through SecAgg+: the same TrainStep, from masked updates.

    ``max_weight``: about the training sites' total patient count (see module doc). The
    server never sees one site's update, so ``checks`` apply to the unmasked mean (and to
    each site's metrics): a bad mean keeps the previous global model for this round.
    """
    planned = list(strategy.configure_train(rnd, arrays, config, train_view))
    legacy = _ConfiguredFit(grid, {m.metadata.dst_node_id: to_fitins(m.content) for m in planned})
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=legacy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    log = _StageLog(grid)
    secagg_workflow(secagg, max_weight, secagg.timeout or timeout)(log, context)

    failures: list[str] = []
    trained: list[tuple[str, Message]] = []
    for stage, messages, replies in log.stages:
        answered, lost = match_replies(
            messages, replies, name_of, f"secure aggregation ({stage.replace('_', ' ')})", timeout
        )
        failures += lost
        if stage == COLLECT_STAGE:
            trained = answered
    raw = {name: dict(r.content.config_records[FITRES_METRICS]) for name, r in trained}
    # Checked as sent (the withheld-metric bit mask still a number), then read.
    rejected = {
        name: why for name, m in raw.items()
        if (why := metrics_problem(m, wire.ALLOWED_TRAIN_METRICS, checks.declared.get(name)))
    }
    per_site = {name: metric_dict(r.content.config_records[FITRES_METRICS]) for name, r in trained}
    failures += [f"{name}: training reply rejected ({why})" for name, why in rejected.items()]
    per_site = {name: m for name, m in per_site.items() if name not in rejected}

    new_arrays = None
    record = None
    if rejected:  # its masked update is inside the sum and cannot be taken out again
        failures.append("a site's reply was rejected, so this round's secure sum is; global model kept")
    elif legacy.results and len(per_site) >= min_sites:
        mean = parameters_to_ndarrays(legacy.results[0][1].parameters)  # every result carries it
        reference = {k: v.numpy() for k, v in arrays.items()}
        unmasked = {
            k: np.asarray(v, dtype=reference[k].dtype)
            for k, v in zip(arrays.keys(), mean, strict=True)
        }
        why = update_problem(reference, unmasked, checks.max_update_ratio)
        if why is None:
            record = ArrayRecord({k: Array(v) for k, v in unmasked.items()})
        else:
            failures.append(f"the securely aggregated mean was rejected ({why}); global model kept")
    if record is not None:
        node_of = {name: nid for nid, name in name_of.items()}
        standins = [
            Message(
                RecordDict({wire.ARRAYS: record, wire.METRICS: MetricRecord(raw[name])}),
                dst_node_id=node_of[name],
                message_type=MessageType.TRAIN,
            )
            for name in sorted(per_site)
        ]
        new_arrays = strategy.aggregate_train(rnd, for_strategy(standins))[0]
    elif not failures:
        failures.append("secure aggregation halted (too few sites for the reconstruction threshold)")
    return TrainStep(
        new_arrays,
        per_site,
        {name_of[nid] for nid in legacy.fitins},
        failures,
        sent=sum(payload_bytes(m.content) for _, ms, _ in log.stages for m in ms),
        received=sum(payload_bytes(r.content) for _, _, rs in log.stages for r in rs if not r.has_error()),
        rejected=rejected,
    )
