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

It also mends one Flower 1.41 fault (``fail_messages_of_stopped_runs``): a message whose
run stops while its objects are being fetched (the coordinator crashed or was restarted
mid-round) was left behind as a task with an empty message, and the ClientApp that took
it waited ~250 s for objects that never come, the hospital deaf to the next run meanwhile.

    python -m client.supernode --pull-interval 0.5 [flower-supernode options]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from flwr.supercore.run import RunNotRunningException

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
    fail_messages_of_stopped_runs(start_client_internal)


class RunStoppedWhileReceiving(RuntimeError):
    """The run of a message stopped before the message's objects had all arrived."""


def fail_messages_of_stopped_runs(module) -> None:
    """Let a message whose run stops mid-fetch fail as a message that could not be fetched.

    Flower 1.41's ``_pull_and_store_message`` creates the task and stores the (still empty)
    message, then fetches its objects; a failed fetch deletes the message and fails the
    task. But a run that stops meanwhile raises ``RunNotRunningException``, a
    BaseException, which passes that ``except Exception`` and is only logged further out
    ("Ignoring message"): the task stays open with a message that never gets its content,
    and the ClientApp that takes it retries the missing objects 500 times. Raised as an
    Exception instead, Flower's own clean-up runs (the message and its objects deleted, the
    task failed), and the ClientApp's fetch fails at once."""
    pull = module.pull_objects
    if getattr(pull, "fails_stopped_runs", False):
        return

    def pull_objects(*args, **kwargs):
        try:
            return pull(*args, **kwargs)
        except RunNotRunningException as exc:
            raise RunStoppedWhileReceiving(
                "its run stopped (the coordinator stopped it, or restarted) before the "
                "message had arrived; it is dropped"
            ) from exc

    pull_objects.fails_stopped_runs = True
    module.pull_objects = pull_objects


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
