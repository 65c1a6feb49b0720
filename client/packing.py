"""Unpack a packed model on arrival and pack the reply's the same way (a ClientApp mod).

A deployed coordinator sends the model's arrays packed, one flat array per dtype (see
micromil_core.federated.transport: Flower moves each array as separate objects, one HTTP
request each). Attached to the whole ClientApp, this mod is outermost: the handlers and the
privacy mods (SecAgg+, client-side clipping) see the arrays by name, as in simulation. The
reply is packed only when the request was, so an unpacking coordinator gets what it sent.
The two record conversions here serve the coordinator's side too (server.grid).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from micromil_core.federated import wire
from micromil_core.federated.transport import is_packed, pack_arrays, unpack_arrays


def packed_record(record: ArrayRecord) -> ArrayRecord:
    """``record``'s arrays packed (see ``transport.pack_arrays``)."""
    return ArrayRecord({k: Array(v) for k, v in pack_arrays({k: v.numpy() for k, v in record.items()}).items()})


def unpacked_record(record: ArrayRecord) -> ArrayRecord:
    """The arrays a packed ``record`` holds, by name; ValueError if they do not unpack."""
    return ArrayRecord({k: Array(v) for k, v in unpack_arrays({k: v.numpy() for k, v in record.items()}).items()})


def packing_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    records = msg.content.array_records if msg.has_content() else {}
    arrays = records.get(wire.ARRAYS)
    if arrays is None or not is_packed(arrays):
        return call_next(msg, ctxt)
    records[wire.ARRAYS] = unpacked_record(arrays)
    reply = call_next(msg, ctxt)
    sent = reply.content.array_records.get(wire.ARRAYS) if reply.has_content() else None
    if sent is not None and not is_packed(sent):
        reply.content.array_records[wire.ARRAYS] = packed_record(sent)
    return reply
