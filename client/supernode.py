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

It also mends two Flower 1.41 faults that a coordinator stopped or restarted mid-round
exposes (the hospital missed the restarted run's roll call in both):
- ``fail_messages_of_stopped_runs``: a message whose run stops while its objects are being
  fetched was left behind as a task with an empty message, and the ClientApp that took it
  waited ~250 s for objects that never come;
- ``keep_replies_in_step``: the loop takes one message, then sends the replies there are
  and takes the next. A reply nobody waited for (to a message whose run stopped just after
  it arrived, which the loop dropped but the ClientApp still answered) made it send that
  one and move on: from then on every reply went out one message late, after the
  coordinator had stopped waiting for it.

    python -m client.supernode --pull-interval 0.5 [flower-supernode options]
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from flwr.supercore.run import RunNotRunningException

from client.flower_waits import CappedWaits, retry_objects_sooner

log = logging.getLogger("micromil.supernode")

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
    keep_replies_in_step(start_client_internal)


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


def keep_replies_in_step(module) -> None:
    """Let each push stage of the SuperNode's loop end only once the reply to the message
    that loop turn took has been sent.

    Flower 1.41's loop (``start_client_internal``) takes a message, then ``_push_messages``
    waits until there is any reply, sends all there are, and returns. It pairs messages and
    replies by count: one stray reply (a stopped run's message that the loop dropped after
    its objects had arrived, but the ClientApp had already taken and answered) is sent in
    the place of the next message's reply, which then waits in the state for the turn
    after, and so on: every later reply goes out one message late. Here the loop's message
    is noted as it is received, and the push stage is run again until its reply has gone;
    a stray reply is still sent (the SuperLink ignores it), just not in its stead."""
    pull, push = module._pull_and_store_message, module._push_messages
    if getattr(push, "keeps_replies_in_step", False):
        return
    taken: dict[str, str | None] = {"message": None}

    def pull_and_store_message(*, receive, **kwargs):
        def receive_and_note():
            got = receive()
            taken["message"] = None if got is None else got[0].metadata.message_id
            return got

        return pull(receive=receive_and_note, **kwargs)

    def push_messages(*, send, **kwargs):
        target, answered = taken["message"], set()

        def send_and_note(message, *args):
            answered.add(message.metadata.reply_to_message_id)
            return send(message, *args)

        push(send=send_and_note, **kwargs)
        while target is not None and target not in answered:
            log.warning("a reply to an earlier message went out; still waiting for the reply to %s", target)
            push(send=send_and_note, **kwargs)

    push_messages.keeps_replies_in_step = True
    module._pull_and_store_message = pull_and_store_message
    module._push_messages = push_messages


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
