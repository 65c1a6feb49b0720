"""Before round 1: wait for the sites to connect, ask each to describe itself (aggregate
counts only, see ``describe_site``) and keep asking until the expected number of sites
have answered, or stop with one error that says who answered and what to do.

What Flower 1.41 does that discovery has to live with (paths under flwr/):
- ``Grid.send_and_receive`` pushes, then pulls only the message ids it just pushed until
  each has a reply or ``timeout`` has passed, and returns what came (possibly nothing); it
  never sends again (superlink/grid/http_grid.py, and our ``server.grid.PromptGrid``). A
  reply that arrives after it returned is not seen by a later call.
- A query can be lost while its node stays listed: a SuperNode that took a message but
  could not fetch the message's objects drops it without a reply
  (supernode/start_client_internal.py, ``_pull_and_store_message``), and a ClientApp task
  that fails before it has its message (``client.worker.run_task``: input not pulled)
  ends FAILED with no reply either: the SuperNode writes error replies for failed AgentApp
  tasks only (supernode/nodestate/in_memory_nodestate.py, ``finish_task``). Only asking
  again helps.
- ``get_node_ids`` lists the nodes the SuperLink holds ONLINE (server/superlink/linkstate/
  in_memory_linkstate.py, ``get_nodes``). A node stays ONLINE until HEARTBEAT_PATIENCE (2)
  x its heartbeat interval (30 s) passes without a heartbeat (common/constant.py): a
  hard-killed SuperNode stays listed up to 60 s. A cleanly stopped one is dropped at once.
  Without node authentication every SuperNode start registers a fresh key pair, hence a
  NEW node id (supernode/fleet_http_connection.py); with it, the id belongs to the
  registered key and survives restarts.
- A query to a node that is offline or unknown is answered by the SuperLink itself with
  an error reply (NODE_UNAVAILABLE, source node = the SuperLink), an expired one with
  MESSAGE_UNAVAILABLE or REPLY_MESSAGE_UNAVAILABLE (server/superlink/linkstate/utils.py).
  Those say the node or message is gone, not that the site failed its check.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from micromil_core.errors import SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.messages import RoundSettings
from micromil_core.federated.setup import SiteInfo

log = logging.getLogger("micromil.server")

WAIT_POLL_SECONDS = 1.0
# The first attempt's length; each later one is twice as long. A reply that comes after its
# attempt ended is lost to us (see above) and its site is asked again, and in a simulation
# whose sites answer one after another the new query queues behind the old: an attempt must
# outlast a healthy federation's answers (a warm worker answers in seconds, a per-message
# process here in 16-22 s, a first feature extraction takes longer). 60 s is also Flower's
# heartbeat patience (2 x 30 s): a hard-killed node's stale id is off the list by the first
# refresh. Doubling keeps the repeated queries to log2(timeout / 60 s) (2 in 300 s).
DESCRIBE_ATTEMPT_S = 60.0
# The SuperLink's own replies for a node or message that is gone: the node is not counted
# and is asked again if it is still listed.
GONE_CODES = frozenset(
    {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}
)


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
        encoder=str(description.get(wire.SITE_ENCODER, "")) or None,
        privacy=str(description.get(wire.SITE_PRIVACY, "none")),
    )


def site_from_reply(node_id: int, reply: Message) -> SiteInfo:
    """A SiteInfo from a site's answer to the QUERY (``client.site_app``'s ``describe``)."""
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
    return site_info(node_id, c.config_records[wire.SITE], counts, moments)


class _Answers:
    """The descriptions heard so far, by node id, and which attempt brought each.

    Two nodes naming the same site in different attempts may be a site that restarted under
    a new node id (without node authentication each start gets one): when the earlier node
    is no longer connected, the later answer replaces it, so the site counts once and
    ``validate_sites`` does not refuse a duplicate name. When both are still connected (or
    both answered in one attempt) they are two live nodes claiming one name, two hospitals
    with one site.name or an impostor: both are kept for the checks to refuse the run. (A
    node killed hard stays listed up to 60 s, so a restart that quick is refused too: start
    the run again a minute later.) Under node authentication (``keep_all``) ids survive
    restarts, so a second node naming a site is never a restart: both are kept for
    ``check_identities`` to name the impostor.
    """

    def __init__(self, keep_all: bool) -> None:
        self.keep_all = keep_all
        self.sites: dict[int, SiteInfo] = {}
        self.attempt_of: dict[int, int] = {}
        self.replaced: dict[int, int] = {}  # an old node id -> the node that replaced it

    def add(self, info: SiteInfo, attempt: int, connected: set[int]) -> None:
        """Record an answer; ``connected``: the node ids listed just after its attempt."""
        gone = [n for n, s in self.sites.items()
                if s.name == info.name and self.attempt_of[n] < attempt and n not in connected]
        if gone and not self.keep_all:
            for old in gone:
                log.warning(
                    "site %s answered from node %d, and now from node %d: node %d has left, so "
                    "this is taken as the site restarted under a new node id", info.name, old,
                    info.node_id, old,
                )
                del self.sites[old]
                self.replaced[old] = info.node_id
        self.sites[info.node_id] = info
        self.attempt_of[info.node_id] = attempt

    def settled(self) -> set[int]:
        """Node ids never to ask again: those that answered, and those replaced."""
        return set(self.sites) | set(self.replaced)

    def names(self) -> set[str]:
        return {s.name for s in self.sites.values()}

    def conflict(self) -> bool:
        """Several kept nodes name one site: the checks after discovery refuse it."""
        return len(self.names()) < len(self.sites)

    def done(self, expected: int) -> bool:
        return len(self.names()) >= expected or self.conflict()


def _ask(grid: Grid, config: ConfigRecord, ids: list[int], timeout: float) -> list[SiteInfo]:
    """One attempt: query ``ids``, wait up to ``timeout`` s; returns the descriptions heard. A
    site whose reply carries an error fails pre-flight; the SuperLink's 'gone' replies do not."""
    messages = [
        Message(RecordDict({wire.CONFIG: config}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # Both Flower Grids set each message's id as they push it; a SuperLink error reply names
    # the SuperLink as its source, so the query it answers says which node it was for.
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    failed, heard = [], []
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error() and reply.error.code in GONE_CODES:
            log.info("node %d did not describe itself: %s", node, reply.error.reason)
        elif reply.has_error():
            failed.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        else:
            heard.append(site_from_reply(reply.metadata.src_node_id, reply))
    if failed:
        raise SiteDataError("sites failed their pre-flight check: " + "; ".join(failed))
    return heard


def _missing_error(answers: _Answers, asked: set[int], expected: int,
                   waited: float) -> SiteDataError:
    names = sorted(answers.names())
    silent = sorted(asked - answers.settled())
    replaced = "".join(
        f"; node {old} was replaced by node {new}, which also calls itself "
        f"{answers.sites[new].name}"
        for old, new in answers.replaced.items() if new in answers.sites
    )
    return SiteDataError(
        f"only {len(names)} of the {expected} expected sites described themselves within "
        f"{waited:.0f} s ({', '.join(names) or 'none'}); {len(silent)} connected node id(s) "
        f"never answered ({', '.join(map(str, silent)) or 'none'}){replaced}. Check that every "
        "site's `flower-client run` is up and can reach this coordinator (its log says "
        "whether it is connected), restart the one that is not, then start the run again"
    )


def discover_sites(grid: Grid, settings: RoundSettings, expected: int, timeout: float,
                   site_nodes: dict[int, str] | None = None) -> list[SiteInfo]:
    """Ask every listed node to describe itself (aggregate counts only, and feature moments),
    asking again, in attempts of growing length, the listed nodes that have not answered,
    until ``expected`` distinct sites have answered; sites sorted by name.

    ``timeout`` covers waiting for the nodes and their answers; a site that connected just
    before it still gets one full attempt (so the wait may run up to ``DESCRIBE_ATTEMPT_S``
    past ``timeout``). ``site_nodes`` (node authentication on) keeps
    every node that names an already named site, for ``check_identities``.
    Raises SiteDataError when a site fails pre-flight or too few answered in time.
    """
    start = time.monotonic()
    listed = set(wait_for_nodes(grid, expected, timeout))
    deadline = max(start + timeout, time.monotonic() + DESCRIBE_ATTEMPT_S)
    config = ConfigRecord(settings.to_config())
    answers = _Answers(keep_all=site_nodes is not None)
    asked: set[int] = set()
    attempt = 0
    while True:
        ask = sorted(listed - answers.settled())
        began = time.monotonic()
        heard = []
        if ask:
            length = max(0.0, min(deadline - began, DESCRIBE_ATTEMPT_S * 2**attempt))
            heard = _ask(grid, config, ask, length)
            asked.update(ask)
            attempt += 1
        listed = set(grid.get_node_ids())  # who is connected now decides what a repeat name is
        for info in heard:
            answers.add(info, attempt, listed)
        if answers.done(expected):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise _missing_error(answers, asked, expected, time.monotonic() - start)
        # Every query answered early (the SuperLink said some nodes are gone) or nobody new
        # to ask: look at the list again in a moment, not in a busy loop.
        time.sleep(max(0.0, min(WAIT_POLL_SECONDS - (time.monotonic() - began), left)))
    if attempt > 1:
        log.info("%d sites described themselves after %d attempts", len(answers.sites), attempt)
    return sorted(answers.sites.values(), key=lambda s: s.name)
