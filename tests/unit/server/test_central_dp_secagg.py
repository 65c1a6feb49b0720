"""Central DP (Flower's wrappers, accounting, checks) and the SecAgg+ message adapter."""

import math
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from client.central_dp import central_clipping_mod
from client.secure_aggregation import from_fitins, secure_aggregation_mod, to_fitres
from micromil_core.config import (
    CentralPrivacyConfig,
    ExperimentConfig,
    FederationConfig,
    PrivacyConfig,
    SecureAggregationConfig,
)
from micromil_core.errors import ConfigError
from micromil_core.federated import wire
from micromil_core.federated.history import RoundRecord
from micromil_core.federated.messages import RoundSettings
from server.privacy import (
    central_dp_entry,
    central_epsilon,
    effective_noise_multiplier,
    secagg_workflow,
)
from server.secure_aggregation import to_fitins
from server.strategies import build_strategy, load_strategy_state, save_strategy_state

FIXED = CentralPrivacyConfig(mode="fixed-clipping", clipping_norm=1.0, noise_multiplier=1.0)
ADAPTIVE = CentralPrivacyConfig(mode="adaptive-clipping", noise_multiplier=0.8, clipped_count_stddev=1.0)


@pytest.mark.parametrize(
    "central, wrapper",
    [
        (FIXED, DifferentialPrivacyServerSideFixedClipping),
        (CentralPrivacyConfig(mode="fixed-clipping", clipping="client", clipping_norm=1.0, noise_multiplier=1.0),
         DifferentialPrivacyClientSideFixedClipping),
        (ADAPTIVE, DifferentialPrivacyServerSideAdaptiveClipping),
        (CentralPrivacyConfig(mode="adaptive-clipping", clipping="client", noise_multiplier=0.8),
         DifferentialPrivacyClientSideAdaptiveClipping),
    ],
)
def test_central_dp_wraps_the_strategy(central, wrapper):
    s = build_strategy(FederationConfig(strategy="fedprox"), 3, PrivacyConfig(central=central))
    assert isinstance(s, wrapper) and isinstance(s.strategy, FedAvg)
    assert s.num_sampled_clients == 3 and s.strategy.weighted_by_key == wire.NUM_EXAMPLES
    assert isinstance(build_strategy(FederationConfig(), 3, PrivacyConfig()), FedAvg)  # off: unwrapped


@pytest.mark.parametrize(
    "fed, privacy, sites, match",
    [
        (FederationConfig(strategy="fedmedian"), PrivacyConfig(central=FIXED), 3,
         "privacy.central.mode=fixed-clipping needs federation.strategy fedavg or fedprox"),
        (FederationConfig(strategy="fedadam"), PrivacyConfig(central=FIXED), 3, "not fedadam"),
        (FederationConfig(), PrivacyConfig(central=CentralPrivacyConfig(
            mode="adaptive-clipping", noise_multiplier=3.0, clipped_count_stddev=1.0)), 3,
         "clipped_count_stddev=1.0 is too small"),
        (FederationConfig(strategy="krum"), PrivacyConfig(secure_aggregation=True), 5,
         "federation.strategy=krum needs each update"),
        (FederationConfig(strategy="fedtrimmedavg"), PrivacyConfig(secure_aggregation=True), 5, "needs each update"),
        (FederationConfig(), PrivacyConfig(secure_aggregation=True), 2, "at least 3 training sites"),
        (FederationConfig(), PrivacyConfig(secure_aggregation=True, secagg=SecureAggregationConfig(num_shares=5)), 3,
         "num_shares=5 exceeds the 3 training sites"),
        (FederationConfig(), PrivacyConfig(secure_aggregation=True, secagg=SecureAggregationConfig(num_shares=2)), 3,
         "must be greater than 2"),
        (FederationConfig(), PrivacyConfig(secure_aggregation=True, secagg=SecureAggregationConfig(num_shares=2.5)), 3,
         "num_shares=2.5 is invalid"),
        (FederationConfig(), PrivacyConfig(secure_aggregation=True, secagg=SecureAggregationConfig(
            num_shares=3, reconstruction_threshold=3)), 3, "must be less than `num_shares`"),
    ],
)
def test_privacy_settings_that_cannot_work_are_refused(fed, privacy, sites, match):
    with pytest.raises(ConfigError, match=match):
        build_strategy(fed, sites, privacy)


def test_secagg_reads_counts_and_fractions_as_flower_does():
    w = secagg_workflow(SecureAggregationConfig(num_shares=5, reconstruction_threshold=0.6), 100.0, 10.0)
    assert (w.num_shares, w.reconstruction_threshold, w.max_weight) == (5, 0.6, 100.0)
    assert isinstance(w.num_shares, int) and isinstance(w.reconstruction_threshold, float)
    assert secagg_workflow(SecureAggregationConfig(), 1.0, 1.0).num_shares == 1.0  # every site
    build_strategy(FederationConfig(strategy="fedadam"), 3, PrivacyConfig(secure_aggregation=True))  # a mean suffices


def test_effective_noise_multiplier_follows_the_largest_site():
    s = build_strategy(FederationConfig(), 3, PrivacyConfig(central=FIXED))
    assert effective_noise_multiplier(s, FIXED, [10, 10, 10], 1.0) == pytest.approx(1.0)
    # the 20-patient site moves the mean by 20/40 * C, not C/3: sigma * 40 / (3 * 20)
    assert effective_noise_multiplier(s, FIXED, [10, 10, 20], 1.0) == pytest.approx(2 / 3)


def _reply(arrays: np.ndarray, patients: int) -> Message:
    return Message(
        RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(arrays)}),
                    wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: patients})}),
        dst_node_id=0, message_type=MessageType.TRAIN,
    )


def test_adaptive_effective_noise_multiplier_prices_what_flower_releases(in_a_task):
    """Measured, not re-derived: one round of Flower's server-side adaptive clipping on
    three sites' updates; the noise it adds to the mean is read off the result, and the
    round's two releases (that noisy mean and Flower's noisy count of clipped updates)
    cost, by Opacus's RDP accountant, what one release at the reported multiplier costs."""
    from opacus.accountants import RDPAccountant

    # A fast-moving norm (clip_norm_lr 1), so that noise added at the norm AFTER its
    # update differs plainly from noise at the norm the updates were clipped to.
    central = replace(ADAPTIVE, clip_norm_lr=1.0)
    a = build_strategy(FederationConfig(), 3, PrivacyConfig(central=central))
    dim = 100_000  # noise draws: the measured std has a standard error of ~0.2 %
    start = np.zeros(dim)
    a.current_arrays = ArrayRecord({"w": Array(start)})  # as configure_train records it
    norm_clipped = a.clipping_norm
    update = np.full(dim, 0.5 * norm_clipped / math.sqrt(dim))  # below the norm: kept as is
    saved = np.random.get_state()
    np.random.seed(2)  # the wrappers draw from NumPy's global generator
    try:
        aggregated, _ = a.aggregate_train(1, [_reply(start + update, 5) for _ in range(3)])
    finally:
        np.random.set_state(saved)
    noise = aggregated["w"].numpy() - update  # every site sent the same update: mean = update
    # A site moves the patient-weighted mean of 3 equal sites by at most norm_clipped / 3.
    update_sigma = noise.std() / (norm_clipped / 3)
    # Flower's documented knob: the std of the noise on the count of clipped updates,
    # which one site changes by at most 1.
    count_sigma = a.clipped_count_stddev
    assert a.clipping_norm > 1.5 * norm_clipped  # none clipped: the norm grew in this round

    sigma = effective_noise_multiplier(a, central, [5, 5, 5], norm_clipped)
    both, one = RDPAccountant(), RDPAccountant()
    both.step(noise_multiplier=update_sigma, sample_rate=1.0)
    both.step(noise_multiplier=count_sigma, sample_rate=1.0)
    one.step(noise_multiplier=sigma, sample_rate=1.0)
    assert one.get_epsilon(1e-5) == pytest.approx(both.get_epsilon(1e-5), rel=0.02)
    assert sigma < min(update_sigma, count_sigma)  # two releases cost more than either


def test_central_epsilon_matches_opacus_rdp():
    from opacus.accountants import RDPAccountant

    for sigmas in ([1.0] * 5, [0.7, 1.3, 2.0]):
        opacus = RDPAccountant()
        for sigma in sigmas:
            opacus.step(noise_multiplier=sigma, sample_rate=1.0)
        assert central_epsilon(sigmas, 1e-5, 3) == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-6)
    assert central_epsilon([], 1e-5, 3) == 0.0


def test_history_entries_accumulate_epsilon_and_skip_rounds_without_release():
    s = build_strategy(FederationConfig(), 3, PrivacyConfig(central=FIXED))
    sites = {n: {wire.NUM_EXAMPLES: 10.0} for n in ("a", "b", "c")}
    history: list[RoundRecord] = []
    for rnd, released in enumerate((True, True, False, True), start=1):
        entry = central_dp_entry(s, FIXED, 1.0, sites, released, history)
        history.append(RoundRecord(rnd, central_dp=entry))
    eps = [r.central_dp["epsilon"] for r in history]
    assert 0 < eps[0] < eps[1] == eps[2] < eps[3] and math.isfinite(eps[3])
    assert [r.central_dp["releases"] for r in history] == [1, 2, 2, 3]
    assert eps[3] == pytest.approx(central_epsilon([1.0] * 3, FIXED.delta, 3))
    assert history[0].central_dp["clipping_norm"] == 1.0 and history[0].central_dp["mode"] == "fixed-clipping"


def test_wrapped_strategy_state_round_trips(tmp_path):
    privacy = PrivacyConfig(central=ADAPTIVE)
    s = build_strategy(FederationConfig(strategy="fedprox"), 3, privacy)
    s.clipping_norm = 0.37
    s.strategy.current_arrays = ArrayRecord({"w": Array(np.arange(3.0))})
    save_strategy_state(s, tmp_path / "state.npz")
    fresh = build_strategy(FederationConfig(strategy="fedprox"), 3, privacy)
    load_strategy_state(fresh, tmp_path / "state.npz")
    assert fresh.clipping_norm == 0.37
    assert np.array_equal(fresh.strategy.current_arrays["w"].numpy(), np.arange(3.0))


def test_norm_bit_is_flowers_key():
    assert KEY_NORM_BIT in wire.CENTRAL_DP_METRICS and KEY_NORM_BIT in wire.ALLOWED_TRAIN_METRICS


# ------------------------------------------------------------------ client mods


def _train_message(central: CentralPrivacyConfig | None = None, clip: float | None = None) -> Message:
    experiment = ExperimentConfig(privacy=PrivacyConfig(central=central or CentralPrivacyConfig()))
    config = RoundSettings(experiment, ["a", "b"]).to_config() | {wire.ROUND: 1}
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    arrays = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32)), "b": Array(np.ones(2, dtype=np.float32))})
    return Message(
        RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config)}),
        dst_node_id=1, message_type=MessageType.TRAIN,
    )


def _trained(msg: Message, _ctx) -> Message:
    """A handler whose update moves every weight by +3 (norm 3 * sqrt(6))."""
    arrays = msg.content.array_records[wire.ARRAYS]
    new = ArrayRecord({k: Array(v.numpy() + 3.0) for k, v in arrays.items()})
    metrics = MetricRecord({wire.NUM_EXAMPLES: 7, "train_loss": 0.5})
    return Message(RecordDict({wire.ARRAYS: new, wire.METRICS: metrics}), reply_to=msg)


def _norm(record: ArrayRecord, start: ArrayRecord) -> float:
    return float(np.sqrt(sum(((record[k].numpy() - start[k].numpy()) ** 2).sum() for k in record)))


def test_clipping_mod_passes_through_without_a_norm(in_a_task):
    msg = _train_message()
    reply = central_clipping_mod(msg, None, _trained)
    assert _norm(reply.content.array_records[wire.ARRAYS], msg.content.array_records[wire.ARRAYS]) == pytest.approx(
        3 * math.sqrt(6), rel=1e-6
    )


@pytest.mark.parametrize("central", [FIXED, ADAPTIVE])
def test_clipping_mod_clips_when_the_server_asks(in_a_task, central):
    msg = _train_message(central, clip=0.5)
    start = msg.content.array_records[wire.ARRAYS]
    reply = central_clipping_mod(msg, None, _trained)
    assert not reply.has_error()
    assert _norm(reply.content.array_records[wire.ARRAYS], start) == pytest.approx(0.5, rel=1e-5)
    bit = reply.content.metric_records[wire.METRICS].get(KEY_NORM_BIT)
    assert bit == (1 if central.mode == "adaptive-clipping" else None)


def test_legacy_round_trip_keeps_arrays_names_and_config(in_a_task):
    msg = _train_message()
    ours = msg.content
    legacy = compat.fitins_to_recorddict(to_fitins(ours), keep_input=True)  # as the workflow sends it
    back = from_fitins(legacy)
    assert list(back.array_records[wire.ARRAYS]) == list(ours.array_records[wire.ARRAYS])
    for k, v in ours.array_records[wire.ARRAYS].items():
        assert np.array_equal(back.array_records[wire.ARRAYS][k].numpy(), v.numpy())
    assert dict(back.config_records[wire.CONFIG]) == dict(ours.config_records[wire.CONFIG])

    reply = _trained(msg, None).content
    fitres = compat.recorddict_to_fitres(to_fitres(reply, ["b", "w"]), keep_input=True)
    assert fitres.num_examples == 7 and fitres.metrics == {wire.NUM_EXAMPLES: 7, "train_loss": 0.5}
    b, w = parameters_to_ndarrays(fitres.parameters)  # in the order the server asked for
    assert np.array_equal(b, np.full(2, 4.0)) and np.array_equal(w, np.full(4, 3.0))


def test_secure_aggregation_mod_leaves_our_messages_alone(in_a_task):
    msg = _train_message()
    seen = []

    def handler(m, ctx):
        seen.append(m)
        return _trained(m, ctx)

    reply = secure_aggregation_mod(msg, None, handler)
    assert seen == [msg] and wire.ARRAYS in reply.content.array_records
