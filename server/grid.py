"""The Grid the coordinator talks through: Flower's, answering sooner.

Flower 1.41's deployed Grid checks for replies every 3 s (``send_and_receive`` in
flwr/superlink/grid/http_grid.py), so every exchange of a round waits up to 3 s after the
last site has answered, and a round is train + evaluate exchanges. This view pushes and
pulls through the same public Grid calls, checking after 50 ms and backing off to 0.5 s:
a long training round costs a pull every half second, a short one no idle seconds. A
reply's objects that are not at the SuperLink yet are retried after 50 ms, not 1 s
(client.flower_waits).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import http_grid

from client.flower_waits import retry_objects_sooner

FIRST_PULL_S = 0.05
LONGEST_WAIT_S = 0.5


class PromptGrid:
    """``grid`` with a ``send_and_receive`` that notices replies within half a second."""

    def __init__(self, grid: Grid, first: float = FIRST_PULL_S, longest: float = LONGEST_WAIT_S) -> None:
        self._grid, self.first, self.longest = grid, first, longest
        retry_objects_sooner(http_grid, "pull_objects")  # the deployed Grid's reply fetch

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """As Flower's: push, then pull until every message is answered or ``timeout`` s
        (None: no limit) have passed; the replies that came."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            left = None if deadline is None else deadline - time.monotonic()
            if not waiting or (left is not None and left <= 0):
                break
            time.sleep(wait if left is None else min(wait, left))
            wait = min(wait * 1.5, self.longest)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
