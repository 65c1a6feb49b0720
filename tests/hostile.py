"""A hostile participant for federation tests and benchmarks/reply_faults.py.

``HostileGrid`` wraps the coordinator's Grid and rewrites what one site sends back, the
way a compromised or broken hospital would: round r's training reply carries fault
``faults[r - 1]`` (NaN/Inf weights, wrong shapes, missing or extra arrays, another dtype,
a huge update, an inflated patient count); ``eval_fault_round``'s evaluation reply claims
an impossible AUC; ``drop_eval_round``'s evaluation reply never arrives
(the site died during evaluation). To the coordinator this is indistinguishable from
the site itself sending it. The wrapper also records every honest site's update norm
relative to the global model, so the bound can be compared with honest updates.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.app.message_type import MessageType

from micromil_core.federated import wire
from micromil_core.federated.validation import update_ratio


def _first_float(arrays: dict[str, np.ndarray]) -> str:
    return next(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and v.size > 1)


def _nan(a, ref):
    k = _first_float(a)
    a[k] = a[k].copy()
    a[k].flat[0] = np.nan
    return a


def _inf(a, ref):
    k = _first_float(a)
    a[k] = a[k].copy()
    a[k].flat[-1] = np.inf
    return a


def _wrong_shape(a, ref):
    k = _first_float(a)
    a[k] = np.concatenate([a[k].ravel(), np.zeros(3, a[k].dtype)])
    return a


def _missing_key(a, ref):
    del a[_first_float(a)]
    return a


def _extra_key(a, ref):
    a["backdoor.weight"] = np.ones((4, 4), np.float32)
    return a


def _wrong_dtype(a, ref):
    k = _first_float(a)
    a[k] = a[k].astype(np.float64)
    return a


def _scaled(a, ref):
    # A "boosted" update: the site's change to the model, multiplied a million times.
    return {k: (ref[k] + 1e6 * (v - ref[k])).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in a.items()}


ARRAY_FAULTS = {
    "nan": _nan,
    "inf": _inf,
    "wrong-shape": _wrong_shape,
    "missing-key": _missing_key,
    "extra-key": _extra_key,
    "wrong-dtype": _wrong_dtype,
    "norm-1e6x": _scaled,
}
METRIC_FAULTS = {"weight-1e9": {wire.NUM_EXAMPLES: 1e9}}  # claims a billion patients
FAULTS = (*ARRAY_FAULTS, *METRIC_FAULTS)
# The words each fault's rejection reason must contain (from micromil_core.federated.validation).
EXPECTED_REASON = {
    "nan": "non-finite", "inf": "non-finite", "wrong-shape": "shape", "missing-key": "missing model arrays",
    "extra-key": "unexpected model arrays", "wrong-dtype": "dtype", "norm-1e6x": "max_update_ratio",
    "weight-1e9": "exceeds",
}


class HostileGrid:
    def __init__(
        self, grid, site: str, faults=FAULTS, eval_fault_round: int | None = None,
        drop_eval_round: int | None = None,
    ) -> None:
        self._grid, self.site, self.faults = grid, site, tuple(faults)
        self.eval_fault_round, self.drop_eval_round = eval_fault_round, drop_eval_round
        self.node_of: dict[str, int] = {}
        self.honest_ratios: list[float] = []  # ||w_site - w_global|| / ||w_global||
        self.tampered: list[tuple[int, str]] = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: m for m in messages}
        dropped = []
        for reply in replies:
            if reply.has_error():
                continue
            kind = reply.metadata.message_type
            if kind == MessageType.QUERY:
                name = str(reply.content.config_records[wire.SITE][wire.SITE_NAME])
                self.node_of[name] = reply.metadata.src_node_id
                continue
            message = sent.get(reply.metadata.reply_to_message_id)
            if message is None or wire.CONFIG not in message.content.config_records:
                continue
            rnd = int(message.content.config_records[wire.CONFIG].get(wire.ROUND, 0))
            hostile = reply.metadata.src_node_id == self.node_of.get(self.site)
            if kind == MessageType.TRAIN:
                ref = {k: v.numpy() for k, v in message.content.array_records[wire.ARRAYS].items()}
                if hostile and 1 <= rnd <= len(self.faults):
                    self._tamper_train(reply, ref, self.faults[rnd - 1])
                    self.tampered.append((rnd, self.faults[rnd - 1]))
                elif not hostile:
                    self.honest_ratios.append(_ratio(reply, ref))
            elif kind == MessageType.EVALUATE and hostile and rnd == self.eval_fault_round:
                metrics = dict(reply.content.metric_records[wire.METRICS])
                reply.content[wire.METRICS] = MetricRecord({**metrics, "auc": 7.0})
                self.tampered.append((rnd, "evaluate: auc 7"))
            elif kind == MessageType.EVALUATE and hostile and rnd == self.drop_eval_round:
                dropped.append(reply)
                self.tampered.append((rnd, "evaluate: no reply"))
        return [r for r in replies if not any(r is d for d in dropped)]

    @staticmethod
    def _tamper_train(reply, ref, fault: str) -> None:
        if fault in METRIC_FAULTS:
            metrics = dict(reply.content.metric_records[wire.METRICS])
            reply.content[wire.METRICS] = MetricRecord({**metrics, **METRIC_FAULTS[fault]})
            return
        arrays = {k: v.numpy() for k, v in reply.content.array_records[wire.ARRAYS].items()}
        bad = ARRAY_FAULTS[fault](arrays, ref)
        reply.content[wire.ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in bad.items()})


def _ratio(reply, ref) -> float:
    return update_ratio(ref, {k: v.numpy() for k, v in reply.content.array_records[wire.ARRAYS].items()})
