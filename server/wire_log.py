"""The coordinator's wire log: every message it sent and every reply it received, as
``OUT/wire-log.jsonl`` (one JSON object per message).

What a reply carries is what the coordinator sees anyway; the log keeps it on the
coordinator's disk so that a hospital (or a test) can check afterwards what left each site:
record names and kinds, metric and config values, and for model arrays only their names,
shapes and dtypes (never the weights). ``audit_replies`` is the check the tests run on it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

WIRE_LOG = "wire-log.jsonl"


def describe(message: Message, direction: str) -> dict[str, Any]:
    """A JSON-able account of one message: its type, peer node, records (arrays by shape)."""
    meta = message.metadata
    peer = meta.dst_node_id if direction == "sent" else meta.src_node_id
    entry: dict[str, Any] = {"direction": direction, "type": meta.message_type, "node": int(peer)}
    if message.has_error():
        entry["error"] = message.error.reason
        return entry
    records: dict[str, Any] = {}
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            records[name] = {"kind": "arrays", "arrays": {
                k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in record.items()}}
        elif isinstance(record, MetricRecord):
            records[name] = {"kind": "metrics", "values": _plain(dict(record))}
        elif isinstance(record, ConfigRecord):
            records[name] = {"kind": "config", "values": _plain(dict(record))}
    entry["records"] = records
    return entry


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Record values as JSON: bytes by length only."""
    out = {}
    for k, v in values.items():
        if isinstance(v, (bytes, bytearray)):
            out[k] = f"<{len(v)} bytes>"
        elif isinstance(v, list):
            out[k] = [f"<{len(x)} bytes>" if isinstance(x, (bytes, bytearray)) else x for x in v]
        else:
            out[k] = v
    return out


class WireLogGrid:
    """``grid`` with every exchange appended to ``path`` (sent messages, then replies)."""

    def __init__(self, grid: Any, path: Path) -> None:
        self._grid, self.path = grid, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        entries = [describe(m, "sent") for m in messages] + [describe(r, "received") for r in replies]
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            for entry in entries:
                fh.write(json.dumps(entry, default=str) + "\n")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def read_wire_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a wire log, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)]


def audit_replies(entries: list[dict[str, Any]], patient_ids: Iterable[str],
                  model_keys: set[str]) -> int:
    """Raise AssertionError if any received reply carries more than the protocol allows:
    arrays other than the model's (or feature moments), metric keys outside the wire's
    lists, lists other than ROC points on the fixed grid, config other than the site's
    description, or any patient id in any text. Returns the number of replies checked."""
    from micromil_core.federated import wire

    ids = [p for p in patient_ids if p]
    allowed_metrics = (wire.ALLOWED_TRAIN_METRICS | wire.ALLOWED_EVAL_METRICS | wire.ALLOWED_SITE_METRICS
                       | wire.ALLOWED_PERSONAL_METRICS)
    description = {wire.SITE_NAME, wire.SITE_ROLE, wire.SITE_CLASSES, wire.SITE_PROBLEMS, wire.SITE_ENCODER,
                   wire.SITE_PRIVACY}
    n = 0
    for entry in entries:
        if entry["direction"] != "received":
            continue
        n += 1
        assert "error" not in entry, entry
        for name, record in entry["records"].items():
            if record["kind"] == "arrays":
                assert set(record["arrays"]) <= model_keys | {"sum", "sum_sq"}, name
            elif record["kind"] == "metrics":
                assert set(record["values"]) <= allowed_metrics, set(record["values"]) - allowed_metrics
                for key, value in record["values"].items():
                    if isinstance(value, list):  # only ROC points on the fixed grid
                        assert key in ("roc_fpr", "roc_tpr") and len(value) == len(wire.ROC_GRID), key
            else:
                assert name == wire.SITE and set(record["values"]) <= description, record
            for text in _strings(record):
                assert not any(pid in text for pid in ids), text
    return n
