"""Flower 1.41's fixed waits, shortened where a federation of a few hospitals pays them on
every exchange of every round. Used by client.supernode (the SuperNode's loop), client.worker
(fetching a task's message) and server.grid (fetching the sites' replies)."""

from __future__ import annotations

import functools
import time
from typing import Any

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
