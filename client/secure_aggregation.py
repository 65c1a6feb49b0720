"""SecAgg+ at a site: Flower's ``secaggplus_mod`` around our train handler.

In Flower 1.41 SecAgg+ runs only on the legacy message path: the server's
``SecAggPlusWorkflow`` sends four train messages per round (setup, share keys, collect
masked vectors, unmask) and, in the third, the model as a legacy ``FitIns`` record;
``secaggplus_mod`` expects a ``FitRes`` record back, which it quantises, masks and strips
of its arrays before it leaves the site. ``secure_aggregation_mod`` converts the legacy
FitIns into our message (``wire.ARRAYS`` + ``wire.CONFIG``), lets the handler train, and
converts its reply into a FitRes (weight = ``wire.NUM_EXAMPLES``, metrics unmasked).
Messages without SecAgg+ settings pass through untouched.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from micromil_core.federated import wire

FITINS_ARRAYS = "fitins.parameters"  # Flower's legacy record names
FITINS_CONFIG = "fitins.config"


def from_fitins(content: RecordDict) -> RecordDict:
    """A legacy FitIns record (arrays named by ``wire.ARRAY_KEYS``) as our train content."""
    config = dict(content.config_records[FITINS_CONFIG])
    keys = [str(k) for k in config.pop(wire.ARRAY_KEYS)]
    params = compat.arrayrecord_to_parameters(content.array_records[FITINS_ARRAYS], keep_input=True)
    arrays = parameters_to_ndarrays(params)
    return RecordDict({
        wire.ARRAYS: ArrayRecord({k: Array(a) for k, a in zip(keys, arrays, strict=True)}),
        wire.CONFIG: ConfigRecord(config),
    })


def to_fitres(content: RecordDict, keys: list[str]) -> RecordDict:
    """Our train reply as a legacy FitRes record, arrays in the server's key order."""
    arrays = content.array_records[wire.ARRAYS]
    metrics = dict(content.metric_records[wire.METRICS])
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([arrays[k].numpy() for k in keys]),
        int(metrics[wire.NUM_EXAMPLES]),
        metrics,
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for train messages that carry its settings; others pass through."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train_in_our_format(legacy: Message, context: Context) -> Message:
        keys = [str(k) for k in legacy.content.config_records[FITINS_CONFIG][wire.ARRAY_KEYS]]
        legacy.content = from_fitins(legacy.content)
        reply = call_next(legacy, context)
        if not reply.has_error():
            reply.content = to_fitres(reply.content, keys)
        return reply

    return secaggplus_mod(msg, ctxt, train_in_our_format)
