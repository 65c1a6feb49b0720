"""The coordinator's wire log (server.wire_log): every exchange on disk, weights by shape
only, and the audit the integration tests run on it catches what must not leave a site."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType

from micromil_core.federated import wire
from server.wire_log import WireLogGrid, audit_replies, read_wire_log

pytestmark = pytest.mark.usefixtures("in_a_task")

WEIGHTS = np.full((3, 2), 0.123456, np.float32)


class AnsweringGrid:
    """Answers each message with ``reply``'s content."""

    def __init__(self, reply: RecordDict) -> None:
        self.reply = reply

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            r = Message(self.reply, dst_node_id=0, message_type=m.metadata.message_type)
            r.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            out.append(r)
        return out


def _exchange(tmp_path, metrics=None, config=None):
    reply = RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(WEIGHTS)}),
                        wire.METRICS: MetricRecord(metrics or {"train_loss": 0.5, wire.NUM_EXAMPLES: 12})})
    if config is not None:
        reply[wire.SITE] = ConfigRecord(config)
    grid = WireLogGrid(AnsweringGrid(reply), tmp_path / "wire-log.jsonl")
    sent = Message(RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(WEIGHTS)})}), dst_node_id=7,
                   message_type=MessageType.TRAIN)
    assert len(grid.send_and_receive([sent])) == 1
    return read_wire_log(tmp_path / "wire-log.jsonl")


def test_every_exchange_is_logged_with_weights_by_shape_only(tmp_path):
    entries = _exchange(tmp_path)
    assert [(e["direction"], e["node"]) for e in entries] == [("sent", 7), ("received", 7)]
    got = entries[1]["records"]
    assert got[wire.ARRAYS] == {"kind": "arrays", "arrays": {"w": {"shape": [3, 2], "dtype": "float32"}}}
    assert got[wire.METRICS]["values"]["train_loss"] == 0.5
    assert "0.123456" not in (tmp_path / "wire-log.jsonl").read_text()  # no weight values
    assert audit_replies(entries, ["p001"], {"w"}) == 1


@pytest.mark.parametrize("metrics, config, model_keys, caught", [
    ({"patient_p001_score": 0.9}, None, {"w"}, "patient_p001_score"),  # a metric off the list
    (None, {wire.SITE_NAME: "h1", wire.SITE_PROBLEMS: ["row 3: p001 has NaN"]}, {"w"}, "p001"),
    (None, None, {"other"}, "arrays"),  # arrays the model does not have
])
def test_the_audit_catches_what_must_not_leave_a_site(tmp_path, metrics, config, model_keys, caught):
    entries = _exchange(tmp_path, metrics, config)
    with pytest.raises(AssertionError, match=caught):
        audit_replies(entries, ["p001"], model_keys)


def test_the_log_is_one_json_object_per_line(tmp_path):
    _exchange(tmp_path)
    _exchange(tmp_path)  # appends: a resumed run keeps the earlier rounds
    lines = (tmp_path / "wire-log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(isinstance(json.loads(line), dict) for line in lines)
