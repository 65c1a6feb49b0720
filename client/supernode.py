"""``flower-supernode`` as Flower ships it, checking the coordinator for messages sooner.

Flower 1.41's SuperNode, when it has no message, waits 3 s before asking the SuperLink again
(``time.sleep(3)`` in flwr/supernode/start_client_internal.py, not configurable). Right
after a hospital replies it asks once, finds nothing (the coordinator still waits for the
other hospitals), and sleeps those 3 s: every exchange of a round, train and evaluate,
waits about 3 s with nothing to do. This runs Flower's own SuperNode with every wait of
that loop capped at ``--pull-interval`` seconds (``supernode.pull_interval``, default 0.5),
and a message's objects that are not at the SuperLink yet retried after 50 ms instead of
1 s; TLS, node authentication, the Runtime API and the rest are Flower's code, unchanged.
An idle hospital then asks the SuperLink 1/pull_interval times a second (Flower: 1/3).

    python -m client.supernode --pull-interval 0.5 [flower-supernode options]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from client.flower_waits import CappedWaits, retry_objects_sooner

PULL_INTERVAL_OPTION = "--pull-interval"


def cap_supernode_waits(cap: float) -> None:
    """Make Flower's SuperNode loop wait at most ``cap`` s between its checks."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not time:
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer waits through the time module: "
            "this Flower is not the 1.41 that client.supernode was written for; set "
            "supernode.pull_interval: 0 to run Flower's flower-supernode unchanged"
        )
    start_client_internal.time = CappedWaits(cap)
    retry_objects_sooner(start_client_internal, "pull_objects")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if PULL_INTERVAL_OPTION not in args:
        raise SystemExit(f"usage: python -m client.supernode {PULL_INTERVAL_OPTION} SECONDS [flower-supernode options]")
    i = args.index(PULL_INTERVAL_OPTION)
    cap = float(args[i + 1])
    del args[i:i + 2]
    cap_supernode_waits(cap)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":  # pragma: no cover
    main()
