"""server.grid.PromptGrid: Flower's Grid calls, replies noticed within half a second, and on a
deployed Grid the model packed on the wire while callers see it by name."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from client.packing import packing_mod
from micromil_core.federated import wire
from micromil_core.federated.transport import is_packed, pack_arrays
from server.grid import PromptGrid

pytestmark = pytest.mark.usefixtures("in_a_task")


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32),
            "n": np.array(5, np.int64)}


def _record(arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class FakeGrid:
    """Stands in for Flower's Grid: keeps what was pushed (as it was at push time) and
    answers each message with ``answer(content)`` after ``delay_pulls`` empty pulls."""

    def __init__(self, answer, delay_pulls: int = 2) -> None:
        self.answer, self.delay_pulls = answer, delay_pulls
        self.pushed: list[dict] = []
        self.pulls = 0
        self.ids: list[str] = []

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            arrays = m.content.array_records[wire.ARRAYS]
            self.pushed.append({k: v.numpy().copy() for k, v in arrays.items()})
            ids.append(f"m{len(self.ids) + i}")
        self.ids += ids
        self._messages = list(zip(ids, messages, strict=True))
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls <= self.delay_pulls:
            return []
        replies = []
        for mid, m in self._messages:
            if mid in ids:
                reply = Message(self.answer(m.content), dst_node_id=0, message_type=MessageType.TRAIN)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                replies.append(reply)
        return replies

    def get_node_ids(self):
        return [1, 2]


def _messages(arrays) -> list[Message]:
    record = _record(arrays)  # one record shared by both messages, as strategies do
    return [Message(RecordDict({wire.ARRAYS: record, wire.CONFIG: ConfigRecord({"round": 1})}),
                    dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]


def _site_reply(content: RecordDict) -> RecordDict:
    """A site's ClientApp: packing_mod around a handler that adds 1 to every float."""
    def handler(msg, ctxt):
        got = msg.content.array_records[wire.ARRAYS]
        assert not is_packed(list(got.keys()))  # the handler sees arrays by name
        new = {k: v.numpy() + 1 if v.numpy().dtype.kind == "f" else v.numpy() for k, v in got.items()}
        return Message(RecordDict({wire.ARRAYS: _record(new)}), dst_node_id=0, message_type=MessageType.TRAIN)

    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    return packing_mod(msg, None, handler).content


def test_deployed_grid_packs_on_the_wire_and_callers_see_arrays_by_name():
    arrays = _model()
    fake = FakeGrid(_site_reply)
    grid = PromptGrid(fake, pack=True, first=0.001, longest=0.002)
    messages = _messages(arrays)
    replies = grid.send_and_receive(messages, timeout=10)
    assert len(fake.pushed) == 2 and all(is_packed(p) for p in fake.pushed)  # packed on the wire
    assert sorted(fake.pushed[0]) == ["packed/<f4", "packed/<i8", "packed/layout"]
    for m in messages:  # the caller's messages keep their arrays by name
        assert sorted(m.content.array_records[wire.ARRAYS].keys()) == ["b", "n", "w"]
    assert len(replies) == 2 and fake.pulls == 3
    for r in replies:
        got = {k: v.numpy() for k, v in r.content.array_records[wire.ARRAYS].items()}
        assert list(got) == list(arrays)
        assert np.array_equal(got["w"], arrays["w"] + 1) and got["n"] == 5 and got["n"].dtype == np.int64


def test_simulated_grid_sends_arrays_as_they_are():
    fake = FakeGrid(lambda content: content)
    PromptGrid(fake, first=0.001).send_and_receive(_messages(_model()), timeout=10)
    assert sorted(fake.pushed[0]) == ["b", "n", "w"]  # not an HttpGrid: no packing


def test_simulated_grid_polls_at_a_steady_pace_and_a_deployed_one_backs_off():
    from flwr.superlink.grid.http_grid import HttpGrid

    from server.grid import FIRST_PULL_S, LONGEST_WAIT_S

    assert PromptGrid(FakeGrid(lambda c: c)).longest == FIRST_PULL_S  # in memory: pulls are free
    deployed = PromptGrid(HttpGrid.__new__(HttpGrid))  # type only: no connection is made
    assert deployed.longest == LONGEST_WAIT_S and deployed.pack
    assert PromptGrid(FakeGrid(lambda c: c), longest=0.3).longest == 0.3


def test_a_reply_that_does_not_unpack_is_left_for_the_checks(caplog):
    def garbage(content):
        packed = pack_arrays(_model())
        packed["packed/<f4"] = packed["packed/<f4"][:2]
        return RecordDict({wire.ARRAYS: _record(packed)})

    grid = PromptGrid(FakeGrid(garbage, delay_pulls=0), pack=True)
    (reply, _) = grid.send_and_receive(_messages(_model()), timeout=10)
    assert is_packed(list(reply.content.array_records[wire.ARRAYS].keys()))
    assert "reply from node 0: packed arrays end before 'w'" in caplog.text


def test_timeout_returns_what_came():
    fake = FakeGrid(lambda c: c, delay_pulls=10**6)
    assert PromptGrid(fake, first=0.01, longest=0.1).send_and_receive(_messages(_model()), timeout=0.2) == []
    assert 2 <= fake.pulls <= 20


@pytest.mark.parametrize("packed_request", [False, True])
def test_packing_mod_answers_in_the_form_it_was_asked(packed_request):
    arrays = _model()
    sent = pack_arrays(arrays) if packed_request else arrays
    content = _site_reply(RecordDict({wire.ARRAYS: _record(sent)}))
    assert is_packed(list(content.array_records[wire.ARRAYS].keys())) == packed_request
