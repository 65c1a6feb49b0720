"""One round's messages over a Flower Grid: send a train or evaluate round to the sites,
pair each reply with its site, screen what came back before aggregation, and count bytes.
Shared by the plain round loop (``federation.py``) and SecAgg+ (``secure_aggregation.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from micromil_core.federated import wire
from micromil_core.federated.setup import (
    SiteInfo,
)
from micromil_core.federated.transport import widen
from micromil_core.federated.validation import (
    metrics_problem,
    personal_metrics_problem,
    quoted_names,
    update_problem,
)
from micromil_core.privacy.disclosure import withheld_names


class NodeSubset:
    """A Grid view that offers a strategy only some nodes (the training sites)."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        live = set(self._grid.get_node_ids())
        return [n for n in self._ids if n in live]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)



def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and config values in a message (payload, not gRPC framing)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(arr.data) for arr in record.values())
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            for value in record.values():
                if isinstance(value, list):  # bytes items: SecAgg+ keys, shares, masked models
                    total += sum(len(v) if isinstance(v, bytes) else 8 for v in value)
                else:
                    total += len(value) if isinstance(value, bytes) else len(str(value))
    return total



def metric_dict(record: MetricRecord) -> dict[str, Any]:
    """A site's MetricRecord as plain values; the small-count guard's ``suppressed``
    bit mask becomes the names of the withheld metrics."""
    out = {k: (list(v) if isinstance(v, list) else float(v)) for k, v in record.items()}
    if wire.SUPPRESSED in out:
        out[wire.SUPPRESSED] = withheld_names(out[wire.SUPPRESSED])
    for count in (wire.NUM_EXAMPLES, wire.FINE_COUNT, wire.MIN_PATIENTS, wire.NUM_VAL, wire.PERSONAL_EPOCH):
        if isinstance(out.get(count), float) and out[count].is_integer():
            out[count] = int(out[count])
    return out



def ask_sites(
    grid: Grid, sites: list[SiteInfo], content: RecordDict, message_type: str, timeout: float,
    task: str, problem: Callable[[str, Message], str | None],
) -> tuple[dict[str, dict[str, Any]], list[str], int, int, dict[str, str]]:
    """Send ``content`` to every connected site of ``sites`` and screen the replies with
    ``problem``; returns per-site metrics (sorted by site), failures naming sites, bytes sent
    and received, and the sites whose replies were refused (with why). ``task`` names the
    exchange in the failures ("evaluation", "personalisation")."""
    live = set(grid.get_node_ids())
    messages = largest_first(
        [Message(content, dst_node_id=s.node_id, message_type=message_type) for s in sites if s.node_id in live],
        {s.node_id: s.name for s in sites}, {s.name: int(s.counts.get(wire.NUM_EXAMPLES, 0)) for s in sites},
    )
    sent = sum(payload_bytes(m.content) for m in messages)
    failures = [f"{s.name}: not connected" for s in sites if s.node_id not in live]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    names = {s.node_id: s.name for s in sites}
    answered, lost = match_replies(messages, replies, names, task, timeout)
    received = sum(payload_bytes(r.content) for _, r in answered)
    usable, rejected, refused = screen_replies(answered, problem, task)
    failures += lost + refused
    results = {name: metric_dict(r.content.metric_records[wire.METRICS]) for name, r in usable}
    return dict(sorted(results.items())), failures, sent, received, rejected


def evaluate_all(
    grid: Grid, sites: list[SiteInfo], arrays: ArrayRecord, config: ConfigRecord,
    server_round: int, timeout: float, checks: ReplyChecks,
) -> tuple[dict[str, dict[str, Any]], list[str], int, int, dict[str, str]]:
    """Send the global model to every site for evaluation (``ask_sites``)."""
    return ask_sites(grid, sites, RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}),
                     MessageType.EVALUATE, timeout, "evaluation", checks.evaluate_problem)



def largest_first(messages: Iterable[Message], name_of: dict[int, str], patients: dict[str, int]) -> list[Message]:
    """``messages`` ordered by their sites' declared patients, most first. A simulation's
    engine hands them to its workers in the order they are pushed (client.flower_waits), so
    the longest job starts first instead of after a small site's (UCSB 3 + 1: a site of 18
    patients trains ~3x as long as one of 3); deployed sites work in parallel anyway."""
    return sorted(messages, key=lambda m: -patients.get(name_of.get(m.metadata.dst_node_id, ""), 0))


def match_replies(
    messages: list[Message], replies: list[Message], name_of: dict[int, str], task: str,
    timeout: float,
) -> tuple[list[tuple[str, Message]], list[str]]:
    """Pair replies with the sites they answer; returns ([(site, reply)] sorted by site,
    failures naming sites).

    Pairing goes by message id: Flower reports a site lost mid-round under the SuperLink's
    own node id, not the lost site's (seen with Flower 1.41), so the sender id would mislead.
    """
    site_of_message = {m.metadata.message_id: name_of[m.metadata.dst_node_id] for m in messages}
    ok: list[tuple[str, Message]] = []
    failures: list[str] = []
    answered: set[str] = set()
    for r in replies:
        site = site_of_message.get(r.metadata.reply_to_message_id) or name_of.get(r.metadata.src_node_id)
        if site is None:
            continue
        answered.add(site)
        if r.has_error():
            failures.append(f"{site}: {task} failed ({r.error.reason})")
        else:
            ok.append((site, r))
    failures += [
        f"{name}: no {task} reply within {timeout:.0f} s"
        for name in sorted(set(site_of_message.values()) - answered)
    ]
    return sorted(ok, key=lambda pair: pair[0]), failures



def only_metrics(reply: Message) -> str | None:
    """Why a reply that should hold only the metrics record does not."""
    names = set(reply.content.keys())
    if wire.METRICS not in names:
        return "the reply lacks the metrics record"
    if names != {wire.METRICS}:
        return f"the reply carries records the protocol does not have ({quoted_names(sorted(names - {wire.METRICS}))})"
    return None


@dataclass(frozen=True)
class ReplyChecks:
    """What a site's reply must satisfy before the coordinator uses it (``validation``)."""

    max_update_ratio: float  # federation.max_update_ratio; 0 = no bound on the update norm
    declared: dict[str, int]  # site name -> patients it declared before round 1
    transport: str = "float32"  # federation.transport: float16 replies are widened first

    def train_problem(self, site: str, reply: Message, reference: dict[str, np.ndarray]) -> str | None:
        content = reply.content
        if wire.ARRAYS not in content.array_records or wire.METRICS not in content.metric_records:
            return "the reply lacks the model arrays or the metrics record"
        try:
            update = {k: v.numpy() for k, v in content.array_records[wire.ARRAYS].items()}
        except Exception as exc:  # bytes that do not decode as arrays
            return f"model arrays are unreadable ({type(exc).__name__})"
        if self.transport == "float16":
            update = widen(update, reference)
        return update_problem(reference, update, self.max_update_ratio) or metrics_problem(
            content.metric_records[wire.METRICS], wire.ALLOWED_TRAIN_METRICS, self.declared.get(site)
        )

    def personal_problem(self, site: str, reply: Message, max_epoch: int,
                         max_folds: int | None = None) -> str | None:
        """A personalise reply: one record of aggregate numbers (the personal model stays at
        the site); ``max_epoch``: the most epochs its fine-tuning could run; ``max_folds``:
        the CV folds the federation asked for."""
        if reply.content.array_records:
            return "the reply carries arrays; a personal model never leaves its site"
        problem = only_metrics(reply)
        return problem or personal_metrics_problem(
            reply.content.metric_records[wire.METRICS], self.declared.get(site), max_epoch, max_folds
        )

    def evaluate_problem(self, site: str, reply: Message) -> str | None:
        if problem := only_metrics(reply):
            return problem
        return metrics_problem(
            reply.content.metric_records[wire.METRICS], wire.ALLOWED_EVAL_METRICS, self.declared.get(site)
        )



def screen_replies(
    answered: list[tuple[str, Message]], problem: Callable[[str, Message], str | None], task: str,
) -> tuple[list[tuple[str, Message]], dict[str, str], list[str]]:
    """Split replies into (usable, {site: why refused}, failures naming each refused site)."""
    usable, rejected = [], {}
    for site, reply in answered:
        why = problem(site, reply)
        if why is None:
            usable.append((site, reply))
        else:
            rejected[site] = why
    failures = [f"{site}: {task} reply rejected ({why})" for site, why in rejected.items()]
    return usable, rejected, failures



def for_strategy(replies: list[Message]) -> list[Message]:
    """The replies as the strategy aggregates them: arrays plus the metrics every site sent.

    Flower 1.41's strategies refuse replies whose MetricRecords differ in keys, and a site
    may withhold its training loss (small-count guard); the round's train metrics are
    averaged by the round loop instead (``weighted_site_metrics``). Keys all sites share stay, so the
    weighting key and central DP's ``norm_bit`` reach the strategy.
    """
    records = [r.content.metric_records[wire.METRICS] for r in replies]
    common = set.intersection(*(set(m) for m in records)) if records else set()
    return [
        Message(
            RecordDict({
                wire.ARRAYS: r.content.array_records[wire.ARRAYS],
                wire.METRICS: MetricRecord({k: m[k] for k in sorted(common)}),
            }),
            dst_node_id=r.metadata.src_node_id,
            message_type=MessageType.TRAIN,
        )
        for r, m in zip(replies, records, strict=True)
    ]



@dataclass
class TrainStep:
    """The training half of a round: what the sites sent back and its aggregate."""

    arrays: ArrayRecord | None  # the new global model; None = nothing was aggregated
    per_site: dict[str, dict[str, Any]]  # site name -> its train metrics (aggregate numbers)
    asked: set[str]  # sites that were sent a training message
    failures: list[str]
    sent: int = 0  # payload bytes
    received: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why its reply was refused



def plain_train_step(
    grid: Grid, strategy: Any, rnd: int, arrays: ArrayRecord, config: ConfigRecord,
    train_view: NodeSubset, name_of: dict[int, str], timeout: float, min_sites: int,
    checks: ReplyChecks,
) -> TrainStep:
    """Send the model to the training sites, then let the strategy aggregate the replies
    that pass ``checks`` (a refused reply is left out of this round and named)."""
    messages = largest_first(strategy.configure_train(rnd, arrays, config, train_view), name_of, checks.declared)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # Sorted by site name: a fixed aggregation order makes float sums reproducible.
    answered, failures = match_replies(messages, replies, name_of, "training", timeout)
    reference = {k: v.numpy() for k, v in arrays.items()}
    usable, rejected, refused = screen_replies(
        answered, lambda site, r: checks.train_problem(site, r, reference), "training"
    )
    ok = [r for _, r in usable]
    received = sum(payload_bytes(r.content) for r in ok)  # as they travelled
    if checks.transport == "float16":  # the strategy averages at the global model's precision
        for r in ok:
            update = {k: v.numpy() for k, v in r.content.array_records[wire.ARRAYS].items()}
            r.content.array_records[wire.ARRAYS] = ArrayRecord(
                {k: Array(v) for k, v in widen(update, reference).items()}
            )
    # The strategy's metric aggregate is not used: the round loop averages per site.
    new_arrays = strategy.aggregate_train(rnd, for_strategy(ok))[0] if len(ok) >= min_sites else None
    return TrainStep(
        new_arrays,
        {name: metric_dict(r.content.metric_records[wire.METRICS]) for name, r in usable},
        {name_of[m.metadata.dst_node_id] for m in messages},
        failures + refused,
        sent=sum(payload_bytes(m.content) for m in messages),
        received=received,
        rejected=rejected,
    )

