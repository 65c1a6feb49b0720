"""client.flower_waits.hand_over_sooner: in Flower's simulation process the engine takes the
coordinator's messages when they are pushed, in the order pushed, and the coordinator's
Grid (server.grid.PromptGrid) wakes when a reply is stored, instead of both polling."""

from __future__ import annotations

import inspect
import sys
import threading
import types
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from client import flower_waits
from client.flower_waits import HAND_OVER, VCE_MODULE, hand_over_sooner
from server.grid import PromptGrid
from server.rounds import largest_first

pytestmark = pytest.mark.usefixtures("in_a_task")


@pytest.fixture
def hand_over(monkeypatch):
    """HAND_OVER as a fresh simulation process has it, restored afterwards."""
    monkeypatch.setattr(HAND_OVER, "active", False)
    monkeypatch.setattr(HAND_OVER, "order", {})
    HAND_OVER.pushed.clear()
    HAND_OVER.replied.clear()
    yield HAND_OVER
    HAND_OVER.pushed.clear()
    HAND_OVER.replied.clear()


def _flower_like_engine(**changed) -> types.ModuleType:
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        pass

    def put_message_into_state(state, queue, f_stop):
        pass

    module = types.ModuleType(VCE_MODULE)
    module.add_messages_to_queue = add_messages_to_queue
    module.put_message_into_state = put_message_into_state
    for name, fn in changed.items():
        setattr(module, name, fn)
    return module


def test_outside_a_simulation_process_nothing_is_replaced(monkeypatch, hand_over):
    monkeypatch.delitem(sys.modules, VCE_MODULE, raising=False)
    assert hand_over_sooner() is False and not hand_over.active


def test_in_a_simulation_process_the_engine_loops_are_replaced_once(monkeypatch, hand_over):
    engine = _flower_like_engine()
    monkeypatch.setitem(sys.modules, VCE_MODULE, engine)
    assert hand_over_sooner() is True and hand_over.active
    assert engine.add_messages_to_queue is flower_waits._messages_to_engine
    assert engine.put_message_into_state is flower_waits._replies_to_state
    assert hand_over_sooner() is True  # a second call (both apps load it) changes nothing


def test_a_flower_whose_loops_changed_keeps_its_own(monkeypatch, hand_over, caplog):
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop, batch):
        pass

    engine = _flower_like_engine(add_messages_to_queue=add_messages_to_queue)
    monkeypatch.setitem(sys.modules, VCE_MODULE, engine)
    assert hand_over_sooner() is False and not hand_over.active
    assert engine.add_messages_to_queue is add_messages_to_queue
    assert engine.put_message_into_state is not flower_waits._replies_to_state  # all or none
    assert "its own polling is kept" in caplog.text


def test_the_installed_flower_has_the_loops_we_replace():
    """An upgrade of Flower that renames or reshapes the loops fails here, not silently."""
    from flwr.server.superlink.fleet.vce import vce_api

    for name, ours in flower_waits._REPLACED.items():
        theirs = getattr(vce_api, name)
        if theirs is not ours:
            assert inspect.signature(theirs).parameters.keys() == inspect.signature(ours).parameters.keys()


def _message(node: int) -> Message:
    m = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                message_type=MessageType.TRAIN)
    m.metadata.__dict__["_message_id"] = f"id-{node}"
    return m


class FakeLinkState:
    """The engine's view of Flower's LinkState: messages per node, replies stored."""

    def __init__(self) -> None:
        self.ins: dict[int, list[Message]] = {}
        self.res: list[Message] = []
        self.lock = threading.Lock()

    def get_message_ins(self, node_id: int, limit: int):
        with self.lock:
            taken, self.ins[node_id] = self.ins.get(node_id, [])[:limit], self.ins.get(node_id, [])[limit:]
        return taken

    def store_message_res(self, message: Message) -> None:
        self.res.append(message)


def test_a_push_wakes_the_engine_which_queues_in_push_order(monkeypatch, hand_over):
    # Without the wake-up the engine would look again only after a minute: the get below
    # would time out.
    monkeypatch.setattr(flower_waits, "ENGINE_IDLE_CHECK_S", 60.0)
    state, queue, stop = FakeLinkState(), Queue(), threading.Event()
    nodes = {1: 0, 2: 1, 3: 2}  # Flower looks node by node in this order
    loop = threading.Thread(target=flower_waits._messages_to_engine, args=(state, queue, nodes, stop))
    loop.start()
    try:
        hand_over.order = {"id-3": 0, "id-1": 1, "id-2": 2}  # the coordinator pushed 3, 1, 2
        with state.lock:
            for node in nodes:
                state.ins[node] = [_message(node)]
        hand_over.pushed.set()
        got = [queue.get(timeout=20).metadata.dst_node_id for _ in nodes]
    finally:
        stop.set()
        hand_over.pushed.set()
        loop.join(timeout=20)
    assert got == [3, 1, 2]
    assert not loop.is_alive()


def test_a_stored_reply_is_announced(hand_over):
    state, queue, stop = FakeLinkState(), Queue(), threading.Event()
    loop = threading.Thread(target=flower_waits._replies_to_state, args=(state, queue, stop))
    loop.start()
    try:
        queue.put(_message(1))
        assert hand_over.replied.wait(timeout=20)
    finally:
        stop.set()
        loop.join(timeout=20)
    assert [m.metadata.dst_node_id for m in state.res] == [1]


class InMemoryGridStub:
    """A simulation's Grid: a reply is there after the test stores it."""

    def __init__(self) -> None:
        self.replies: list[Message] = []
        self.pulls = 0

    def push_messages(self, messages):
        return [f"id-{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        return [r for r in self.replies if r.metadata.reply_to_message_id in ids]


def test_the_grid_announces_its_push_and_wakes_on_a_reply(hand_over):
    hand_over.active = True
    grid = InMemoryGridStub()
    # A minute between pulls: only the reply's announcement can end the wait in time.
    prompt = PromptGrid(grid, first=60.0, longest=60.0)
    result: list[Message] = []
    caller = threading.Thread(target=lambda: result.extend(
        prompt.send_and_receive([_message(2), _message(1)], timeout=120)))
    caller.start()
    assert hand_over.pushed.wait(timeout=20)
    assert hand_over.order == {"id-2": 0, "id-1": 1}
    for node in (2, 1):
        reply = Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)
        reply.metadata.__dict__["_reply_to_message_id"] = f"id-{node}"
        grid.replies.append(reply)
    hand_over.replied.set()
    caller.join(timeout=20)
    assert not caller.is_alive() and len(result) == 2 and grid.pulls <= 2


def test_without_the_engine_loops_the_grid_keeps_its_timer(hand_over):
    grid = InMemoryGridStub()
    prompt = PromptGrid(grid, first=0.001, longest=0.001)
    reply = Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)
    reply.metadata.__dict__["_reply_to_message_id"] = "id-1"
    grid.replies.append(reply)
    assert len(prompt.send_and_receive([_message(1)], timeout=20)) == 1
    assert not hand_over.pushed.is_set() and hand_over.order == {}


def test_the_largest_site_is_asked_first():
    name_of = {1: "small", 2: "large", 3: "middle", 4: "silent"}
    patients = {"small": 3, "large": 18, "middle": 4}
    ordered = largest_first([_message(n) for n in (1, 2, 3, 4)], name_of, patients)
    assert [m.metadata.dst_node_id for m in ordered] == [2, 3, 1, 4]
