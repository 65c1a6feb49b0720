"""Flower 1.41's fixed waits, shortened where a federation of a few hospitals pays them on
every exchange of every round. Used by client.supernode (the SuperNode's loop), client.worker
(fetching a task's message), server.grid (fetching the sites' replies) and, in Flower's
simulation process, server.app (the engine's hand-over of messages and replies)."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import time
from queue import Empty
from typing import Any

log = logging.getLogger("micromil.flower")

# Flower retries an object that is not there yet after 1 s, doubling up to 10 s
# (PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP in flwr/supercore/constant.py). A message is
# announced before its objects have all arrived, so the first try usually finds one
# missing and the whole message then waits a second or more; retry sooner instead.
OBJECT_RETRY_FIRST_S = 0.05
OBJECT_RETRY_LONGEST_S = 0.5


class CappedWaits:
    """The ``time`` module as one Flower module sees it, with ``sleep`` capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def retry_objects_sooner(module: Any, name: str) -> None:
    """Make ``module.name`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``,
    as that module imported it) retry a missing object after 50 ms, backing off to 0.5 s."""
    pull = getattr(module, name)
    if isinstance(pull, functools.partial):
        return
    setattr(module, name, functools.partial(pull, initial_backoff=OBJECT_RETRY_FIRST_S,
                                            backoff_cap=OBJECT_RETRY_LONGEST_S))


# Flower's simulation engine (flwr/server/superlink/fleet/vce/vce_api.py) looks for the
# coordinator's messages every 0.1 s (``add_messages_to_queue``), and the coordinator
# then looks for the replies on a timer: each exchange of a round waits up to 0.1 s before
# a site starts and again after the last one answers. Engine and coordinator share one
# process there, so events hand the work on instead.
VCE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"
ENGINE_IDLE_CHECK_S = 0.1  # with no push, the engine still looks as often as Flower's does


class SimulationHandOver:
    """Events between the coordinator's Grid and Flower's simulation engine in one process:
    ``pushed`` when the coordinator has pushed messages, ``replied`` when a site's reply is
    stored. ``active``: the engine's loops are ours (``hand_over_sooner``)."""

    def __init__(self) -> None:
        self.pushed = threading.Event()
        self.replied = threading.Event()
        self.active = False
        self.order: dict[str, int] = {}  # message id -> its place in the coordinator's last push


HAND_OVER = SimulationHandOver()


def _messages_to_engine(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (a node's next message per look), looking again as
    soon as the coordinator pushes, and queueing what it finds in the order pushed."""
    while not f_stop.is_set():
        HAND_OVER.pushed.clear()  # before the look: a push during it wakes the next wait
        found = [m for node_id in nodes_mapping.keys() for m in state.get_message_ins(node_id=node_id, limit=1)]
        # In the order pushed (Flower: node order), so the coordinator decides what starts first.
        order = HAND_OVER.order
        for message in sorted(found, key=lambda m: order.get(m.metadata.message_id, len(order))):
            queue.put(message)
        HAND_OVER.pushed.wait(ENGINE_IDLE_CHECK_S)


def _replies_to_state(state: Any, queue: Any, f_stop: threading.Event) -> None:
    """Flower's ``put_message_into_state``, telling the coordinator each reply is there."""
    while not f_stop.is_set():
        try:
            reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(reply)
        HAND_OVER.replied.set()


_REPLACED = {"add_messages_to_queue": _messages_to_engine, "put_message_into_state": _replies_to_state}


def hand_over_sooner() -> bool:
    """In Flower's simulation process (its engine module is loaded), replace the engine's
    two hand-over loops with the event-driven ones above; elsewhere do nothing. Call before
    the engine starts its threads (Flower loads the apps first). Returns whether they are
    in place; a Flower whose loops take other arguments keeps its own."""
    vce = sys.modules.get(VCE_MODULE)
    if vce is None:
        return False
    for name, ours in _REPLACED.items():
        theirs = getattr(vce, name, None)
        if theirs is ours:
            continue
        if theirs is None or inspect.signature(theirs).parameters.keys() != inspect.signature(ours).parameters.keys():
            log.warning("Flower's simulation engine has no %s(...) of the expected form; "
                        "its own polling is kept", name)
            return HAND_OVER.active
    for name, ours in _REPLACED.items():
        setattr(vce, name, ours)
    HAND_OVER.active = True
    return True
