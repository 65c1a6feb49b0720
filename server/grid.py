"""The Grid the coordinator talks through: Flower's, answering sooner.

Flower 1.41's deployed Grid checks for replies every 3 s (``send_and_receive`` in
flwr/superlink/grid/http_grid.py), so every exchange of a round waits up to 3 s after the
last site has answered, and a round is train + evaluate exchanges. This view pushes and
pulls through the same public Grid calls, checking after 50 ms and backing off to 0.5 s:
a long training round costs a pull every half second, a short one no idle seconds. In
simulation the Grid is Flower's in-memory one, whose pull is a lookup in this process:
there it checks every 50 ms throughout, and in Flower's simulation process, where the
engine's loops are ours (client.flower_waits.hand_over_sooner), it tells the engine of
each push and wakes as soon as a reply is stored (docs/benchmarks.md). A reply's objects
that are not at the SuperLink yet are retried after 50 ms, not 1 s (client.flower_waits).
On a deployed Grid the model's arrays travel packed (one array per dtype,
micromil_core.federated.transport): a message is then a handful of objects instead of two
per array. Callers, and a ``grid_tap`` around this view, see the arrays unpacked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import http_grid

from client.flower_waits import HAND_OVER, retry_objects_sooner
from client.packing import packed_record, unpacked_record
from micromil_core.federated import wire
from micromil_core.federated.transport import is_packed

log = logging.getLogger("micromil.server")

FIRST_PULL_S = 0.05
LONGEST_WAIT_S = 0.5


class PromptGrid:
    """``grid`` with a ``send_and_receive`` that notices replies within half a second."""

    def __init__(self, grid: Grid, first: float = FIRST_PULL_S, longest: float | None = None,
                 pack: bool | None = None) -> None:
        self.deployed = deployed = isinstance(grid, http_grid.HttpGrid)
        # In memory (simulation) a pull costs nothing: no back-off there.
        longest = (LONGEST_WAIT_S if deployed else first) if longest is None else longest
        self._grid, self.first, self.longest = grid, first, longest
        # Simulation passes messages in memory: nothing to gain from packing there.
        self.pack = deployed if pack is None else pack
        retry_objects_sooner(http_grid, "pull_objects")  # the deployed Grid's reply fetch

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """As Flower's: push, then pull until every message is answered or ``timeout`` s
        (None: no limit) have passed; the replies that came."""
        # In Flower's simulation process the engine is told of the push and tells of each
        # reply (client.flower_waits.hand_over_sooner); the timer then only backs it up.
        hand_over = HAND_OVER if HAND_OVER.active and not self.deployed else None
        pushed = self._push(list(messages))
        waiting = set(pushed)
        if hand_over:
            hand_over.order = {message_id: i for i, message_id in enumerate(pushed)}
            hand_over.pushed.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first
        while waiting:
            if hand_over:
                hand_over.replied.clear()  # before the pull: a reply during it ends the wait
            got = [_unpacked(m) for m in self._grid.pull_messages(waiting)]
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            left = None if deadline is None else deadline - time.monotonic()
            if not waiting or (left is not None and left <= 0):
                break
            pause = wait if left is None else min(wait, left)
            if hand_over:
                hand_over.replied.wait(pause)
            else:
                time.sleep(pause)
            wait = min(wait * 1.5, self.longest)
        return replies

    def _push(self, messages: list[Message]) -> list[str]:
        """Push with each model packed; the messages keep their unpacked arrays afterwards
        (Flower has sent them by then) and the ids the SuperLink gave them."""
        if not self.pack:
            return list(self._grid.push_messages(messages))
        swapped = []
        for m in messages:
            records = m.content.array_records if m.has_content() else {}
            if wire.ARRAYS in records and not is_packed(records[wire.ARRAYS]):
                swapped.append((m, records[wire.ARRAYS]))
                records[wire.ARRAYS] = packed_record(records[wire.ARRAYS])
        try:
            return list(self._grid.push_messages(messages))
        finally:
            for m, arrays in reversed(swapped):
                m.content.array_records[wire.ARRAYS] = arrays

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _unpacked(reply: Message) -> Message:
    """``reply`` with a packed model unpacked in place; one that does not unpack is left
    as it came, for the reply checks to refuse and name."""
    if reply.has_content() and wire.ARRAYS in reply.content.array_records:
        arrays = reply.content.array_records[wire.ARRAYS]
        if is_packed(arrays):
            try:
                reply.content.array_records[wire.ARRAYS] = unpacked_record(arrays)
            except ValueError as exc:  # the checks then name the model arrays it lacks
                log.warning("reply from node %s: %s", reply.metadata.src_node_id, exc)
    return reply
