"""federation.transport=float16: sites upload half the bytes; the coordinator checks and
aggregates at the global model's precision."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from micromil_core.config import FederationConfig, PrivacyConfig, load_config
from micromil_core.errors import ConfigError
from micromil_core.federated import wire
from micromil_core.federated.transport import is_packed, narrow, pack_arrays, unpack_arrays, widen
from server.rounds import ReplyChecks
from server.strategies import build_strategy


def _state():
    torch.manual_seed(0)
    return {"w": torch.randn(64, 32), "b": torch.randn(32), "steps": torch.tensor(7)}


def test_float16_halves_the_floats_and_keeps_other_dtypes():
    state = _state()
    sent = narrow(state, "float16")
    assert sent["w"].dtype == torch.float16 and sent["steps"].dtype == torch.int64
    assert narrow(state, "float32") == state
    reference = {k: v.numpy() for k, v in state.items()}
    back = widen({k: v.numpy() for k, v in sent.items()}, reference)
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in reference.items()}
    # float16 keeps 11 significant bits: the relative error per weight is below 2^-11.
    assert np.max(np.abs(back["w"] - reference["w"]) / np.abs(reference["w"])) < 2 ** -11
    record_bytes = [sum(a.numpy().nbytes for a in ArrayRecord(s).values()) for s in (state, sent)]
    assert record_bytes[1] < 0.51 * record_bytes[0] + 8


def _reply(arrays):
    # The checks read the reply's content only (a Flower Message outside a run has no id).
    return SimpleNamespace(content=RecordDict({
        wire.ARRAYS: ArrayRecord(arrays),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 5, "train_loss": 0.3}),
    }))


def test_the_coordinator_checks_float16_replies_at_full_precision():
    state = _state()
    reference = {k: v.numpy() for k, v in state.items()}
    trained = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in state.items()}
    fp16 = _reply(narrow(trained, "float16"))
    assert ReplyChecks(10.0, {"h1": 5}, "float16").train_problem("h1", fp16, reference) is None
    # Without the setting a float16 reply is the wrong dtype, as before.
    assert "dtype float16" in ReplyChecks(10.0, {"h1": 5}).train_problem("h1", fp16, reference)
    # A weight beyond float16's range arrives as Inf and is refused as such.
    huge = dict(trained, w=trained["w"] * 1e6)
    why = ReplyChecks(0.0, {"h1": 5}, "float16").train_problem("h1", _reply(narrow(huge, "float16")), reference)
    assert "non-finite" in why


@pytest.mark.parametrize("privacy", [
    PrivacyConfig(secure_aggregation=True),
    load_config(None, ["privacy.central.mode=fixed-clipping", "privacy.central.noise_multiplier=0.5",
                       "privacy.central.clipping_norm=1.0", "privacy.central.clipping=client"]).privacy,
])
def test_float16_transport_is_refused_where_the_site_must_send_its_own_weights(privacy):
    with pytest.raises(ConfigError, match="federation.transport=float16 cannot be combined"):
        build_strategy(FederationConfig(transport="float16"), 3, privacy)


def test_unknown_transport_is_a_config_error():
    with pytest.raises(ConfigError, match="federation.transport='bfloat8' is invalid"):
        load_config(None, ["federation.transport=bfloat8"])


def _model_arrays():
    from micromil_core.models.registry import build_model

    torch.manual_seed(1)
    state = build_model("micromil", 32, 2).state_dict()
    return {k: v.numpy() for k, v in state.items()}


def test_packing_round_trips_every_array_exactly_with_its_dtype_and_order():
    arrays = {**_model_arrays(), "steps": np.array(7, np.int64), "half": np.ones((3, 2), np.float16)}
    packed = pack_arrays(arrays)
    assert is_packed(packed) and sorted(packed) == ["packed/<f2", "packed/<f4", "packed/<i8", "packed/layout"]
    back = unpack_arrays(packed)
    assert list(back) == list(arrays)
    for name, arr in arrays.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        assert np.array_equal(back[name], arr)


@pytest.mark.parametrize("spoil, reason", [
    (lambda p: p.pop("packed/layout"), "without a readable layout"),
    (lambda p: p.update({"packed/layout": np.frombuffer(b"[[1", np.uint8)}), "without a readable layout"),
    (lambda p: p.update({"packed/<f4": p["packed/<f4"][:-1]}), "end before"),
    (lambda p: p.update({"packed/<f4": np.concatenate([p["packed/<f4"], [1.0]]).astype(np.float32)}),
     "do not match their layout"),
    (lambda p: p.update({"packed/<f4": p["packed/<f4"].astype(np.float64)}), "lack the float32 values"),
    (lambda p: p.update({"packed/<u1": np.zeros(3, np.uint8)}), "do not match their layout"),
    (lambda p: p.update({"packed/layout": np.frombuffer(b'[["w", "<f4", [-1]]]', np.uint8)}),
     "negative dimension"),
])
def test_a_spoilt_packing_is_an_error_that_says_what_is_wrong(spoil, reason):
    packed = pack_arrays(_model_arrays())
    spoil(packed)
    with pytest.raises(ValueError, match=reason):
        unpack_arrays(packed)
