"""client.supernode: Flower's SuperNode with its loop's waits capped (Flower 1.41 waits 3 s
between checks for a message, hard-coded)."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
from flwr.supernode import start_client_internal

from client.supernode import CappedWaits, cap_supernode_waits, main


@pytest.fixture
def restore_flower():
    pull = start_client_internal.pull_objects
    yield
    start_client_internal.time = time
    start_client_internal.pull_objects = pull


def test_the_waits_patched_are_flowers_idle_and_reply_waits():
    # What is capped: Flower 1.41's idle wait between pulls and its wait for the reply.
    # A Flower that changes these lines fails here, before a deployment relies on the cap.
    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2
    assert start_client_internal.time is time


def test_cap_applies_to_every_wait_of_the_loop_only(restore_flower, monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    cap_supernode_waits(0.5)
    assert isinstance(start_client_internal.time, CappedWaits)
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.2)
    assert slept == [0.5, 0.2]
    assert start_client_internal.time.monotonic is time.monotonic  # the rest is the time module
    with pytest.raises(RuntimeError, match="supernode.pull_interval: 0"):
        cap_supernode_waits(0.5)  # already replaced: not the module this was written for


def test_main_needs_the_interval():
    with pytest.raises(SystemExit, match="--pull-interval SECONDS"):
        main(["--superlink", "x:1"])


def _receive_with_run_stopping(module):
    """Flower's own ``_pull_and_store_message`` taking one message of a known run whose
    objects cannot be fetched because the run stops meanwhile; returns the node state."""
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supercore.run import Run, RunNotRunningException
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    store = InMemoryObjectStore()
    state = InMemoryNodeState(store)
    state.set_node_id(7)
    state.store_run(Run.create_empty(1))
    message = Message(RecordDict({"model": ArrayRecord([np.zeros(3)])}), dst_node_id=7,
                      message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    tree = get_object_tree(message)

    def stopped(run_id, object_id):
        raise RunNotRunningException

    module._pull_and_store_message(
        state=state, object_store=store, node_config={}, receive=lambda: (message, tree),
        get_run=None, get_fab=None, pull_object=stopped,
        confirm_message_received=lambda run_id, object_id: None, trusted_entities=None,
    )
    return state


def test_a_message_whose_run_stops_mid_fetch_fails_its_task(restore_flower, in_a_task):
    # The coordinator restarted mid-round: the message's run stops while the SuperNode
    # fetches its objects. The task must not stay open with an empty message, or the
    # hospital's single ClientApp process waits ~250 s on it and misses the next run.
    left_open = _receive_with_run_stopping(start_client_internal)
    # Flower 1.41 as shipped leaves the task open (if this fails, Flower fixed it: drop the mend)
    assert [t.status.status for t in left_open.get_tasks()] == ["pending"]

    cap_supernode_waits(0.5)
    state = _receive_with_run_stopping(start_client_internal)
    [task] = [t.status for t in state.get_tasks()]
    assert (task.status, task.sub_status) == ("finished", "failed")
    assert "its run stopped" in task.details
    assert not state.get_messages_legacy()  # the empty message is gone with it
