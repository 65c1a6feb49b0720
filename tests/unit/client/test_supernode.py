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
    names = ("pull_objects", "_pull_and_store_message", "_push_messages")
    kept = {name: getattr(start_client_internal, name) for name in names}
    yield
    start_client_internal.time = time
    for name, value in kept.items():
        setattr(start_client_internal, name, value)


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


def _node_state():
    """A SuperNode's in-memory state and object store, knowing run 1."""
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    store = InMemoryObjectStore()
    state = InMemoryNodeState(store)
    state.set_node_id(7)
    state.store_run(Run.create_empty(1))
    return state, store


def _receive_with_run_stopping(module):
    """Flower's own ``_pull_and_store_message`` taking one message of a known run whose
    objects cannot be fetched because the run stops meanwhile; returns the node state."""
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.run import RunNotRunningException

    state, store = _node_state()
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


def _loop_turn_with_a_stray_reply(module):
    """One turn of the SuperNode's loop (Flower's own functions, as ``module`` has them) that
    takes message B while a reply to an earlier, dropped message A is waiting; B's reply
    arrives a moment later. Returns the message ids whose replies the turn sent."""
    import threading

    from flwr.app import Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    state, store = _node_state()

    def message(kind):
        m = Message(RecordDict(), dst_node_id=7, message_type=kind)
        m.metadata.__dict__["_message_id"] = m.object_id
        return m

    stray_to, taken = message("evaluate"), message("query")
    start_client_internal._insert_message(Message(RecordDict(), reply_to=stray_to), state, store)
    module._pull_and_store_message(
        state=state, object_store=store, node_config={}, receive=lambda: (taken, get_object_tree(taken)),
        get_run=None, get_fab=None,
        pull_object=lambda run_id, object_id: get_all_nested_objects(taken)[object_id].deflate(),
        confirm_message_received=lambda run_id, object_id: None, trusted_entities=None,
    )
    assert [m.metadata.message_id for m in state.get_messages_legacy(is_reply=False)] == [taken.metadata.message_id]
    answer = threading.Timer(0.3, start_client_internal._insert_message,
                             (Message(RecordDict(), reply_to=taken), state, store))
    answer.start()
    sent = []

    def send(reply, tree, runtime):
        sent.append(reply.metadata.reply_to_message_id)
        return set(), "session"

    module._push_messages(state=state, object_store=store, send=send,
                          push_object=lambda run_id, session, object_id, content: None)
    answer.join()
    return sent, stray_to.metadata.message_id, taken.metadata.message_id


def test_a_stray_reply_does_not_put_the_replies_one_message_late(restore_flower, in_a_task):
    # A stopped run's message, dropped by the loop after its objects arrived, still got an
    # answer from the ClientApp. Flower 1.41 sends that stray reply in the turn of the next
    # message and moves on, so the next message's reply goes out a turn late, and so on.
    sent, stray, taken = _loop_turn_with_a_stray_reply(start_client_internal)
    assert sent == [stray]  # as shipped: the turn ended without the reply to its message

    cap_supernode_waits(0.05)
    sent, stray, taken = _loop_turn_with_a_stray_reply(start_client_internal)
    assert sent == [stray, taken]  # the stray went out too, but the turn waited for its own
