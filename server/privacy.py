"""Central differential privacy at the coordinator: Flower's DP strategy wrappers, the
checks that say which federation settings they fit, and the epsilon they spend.

Privacy unit: ONE SITE's model update in a round (a hospital's whole contribution), not
a patient. The guarantee bounds what the released global models reveal about whether a
given hospital took part; per-patient protection at a site is local DP-SGD's job
(``privacy.mode: dp-sgd``). Each round every training site's update is clipped to a norm
C (at the server, or at the site with ``clipping: client``) and Gaussian noise of std
``noise_multiplier * C / n_sites`` is added to the aggregate (McMahan et al. 2018,
arXiv:1710.06963; adaptive C: Andrew et al. 2021, arXiv:1905.03871).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as AccountingConfig
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from micromil_core.config import (
    CentralPrivacyConfig,
    FederationConfig,
    PrivacyConfig,
    SecureAggregationConfig,
)
from micromil_core.errors import ConfigError
from micromil_core.federated import wire
from micromil_core.federated.history import RoundRecord

# The wrappers calibrate the noise to a MEAN of clipped updates; only strategies whose
# aggregate is that mean keep the guarantee (a median or Krum's pick is not a mean, and
# an adaptive server optimiser rescales the noisy mean after the noise is added).
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")
# Secure aggregation hands the server only the weighted mean of the updates: strategies
# that need each update (median, trimmed mean, Krum) cannot run on it.
SECURE_AGGREGATION_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# With two sites each one could subtract its own update from the next global model and
# read the other's: masking the sum protects nobody.
MIN_SECURE_SITES = 3


def check_privacy_fits(fed: FederationConfig, privacy: PrivacyConfig, n_train_sites: int) -> None:
    """Refuse central DP / secure aggregation settings that cannot work together."""
    central = privacy.central
    if central.enabled and fed.strategy not in CENTRAL_DP_STRATEGIES:
        raise ConfigError(
            f"privacy.central.mode={central.mode} needs federation.strategy "
            f"{' or '.join(CENTRAL_DP_STRATEGIES)} (the DP noise is calibrated to a mean of "
            f"clipped updates), not {fed.strategy}; change one of them"
        )
    if central.mode == "adaptive-clipping" and central.noise_multiplier >= 2 * central.clipped_count_stddev:
        # Flower splits sigma between the update and the clipped-site count: the count
        # needs stddev > sigma / 2 or no noise is left for the update.
        raise ConfigError(
            f"privacy.central.clipped_count_stddev={central.clipped_count_stddev} is too small "
            f"for noise_multiplier {central.noise_multiplier}: set it above "
            f"{central.noise_multiplier / 2:g} (e.g. {max(1.0, central.noise_multiplier):g})"
        )
    if fed.transport != "float32" and (privacy.secure_aggregation or (central.enabled and central.clipping == "client")):
        # SecAgg+ quantises what the site returns and client-side clipping measures it: both
        # need the weights the site trained, not a float16 copy.
        raise ConfigError(
            f"federation.transport={fed.transport} cannot be combined with "
            + ("privacy.secure_aggregation" if privacy.secure_aggregation else "privacy.central.clipping=client")
            + "; use federation.transport=float32"
        )
    if not privacy.secure_aggregation:
        return
    if fed.strategy not in SECURE_AGGREGATION_STRATEGIES:
        raise ConfigError(
            f"privacy.secure_aggregation gives the server only the sum of the sites' updates, "
            f"but federation.strategy={fed.strategy} needs each update; use one of "
            f"{', '.join(SECURE_AGGREGATION_STRATEGIES)} or turn secure aggregation off"
        )
    if n_train_sites < MIN_SECURE_SITES:
        raise ConfigError(
            f"privacy.secure_aggregation needs at least {MIN_SECURE_SITES} training sites "
            f"({n_train_sites} configured): with fewer, a site can subtract its own update "
            "from the global model and read the other's"
        )
    secagg = privacy.secagg
    for name in ("num_shares", "reconstruction_threshold"):
        value = getattr(secagg, name)
        if value > n_train_sites:
            raise ConfigError(
                f"privacy.secagg.{name}={value:g} exceeds the {n_train_sites} training sites; "
                "lower it or give a fraction of the sites (e.g. 1.0 = all)"
            )
    secagg_workflow(secagg, max_weight=1.0, timeout=1.0)  # Flower's own checks


def wrap_central_dp(strategy: Any, cfg: CentralPrivacyConfig, n_train_sites: int) -> Any:
    """``strategy`` inside Flower's DP wrapper for ``cfg.mode`` (unchanged when off).

    No accountant is handed to the wrapper: its accounted mode requires equal site
    weights, and sites here are weighted by patients; ``central_dp_entry`` accounts
    instead, for the actual weights.
    """
    if not cfg.enabled:
        return strategy
    if cfg.mode == "fixed-clipping":
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if cfg.clipping == "server"
            else DifferentialPrivacyClientSideFixedClipping
        )
        return wrapper(strategy, cfg.noise_multiplier, cfg.clipping_norm, n_train_sites)
    wrapper = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if cfg.clipping == "server"
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    return wrapper(
        strategy,
        cfg.noise_multiplier,
        n_train_sites,
        initial_clipping_norm=cfg.initial_clipping_norm,
        target_clipped_quantile=cfg.target_clipped_quantile,
        clip_norm_lr=cfg.clip_norm_lr,
        clipped_count_stddev=cfg.clipped_count_stddev,
    )


def clipping_norm(strategy: Any) -> float:
    """The norm the wrapper clips this round's updates to (adaptive: changes per round)."""
    return float(strategy.clipping_norm)


def fresh_noise() -> None:
    """Reseed NumPy's global generator, which the wrappers draw the noise from, from the
    OS: the run seed also seeds it, and noise an observer can replay protects nothing."""
    np.random.seed(None)


def effective_noise_multiplier(
    strategy: Any, cfg: CentralPrivacyConfig, weights: Iterable[float], norm_clipped: float
) -> float:
    """The noise multiplier of this round's release for the most exposed site.

    Shapes: ``weights`` (S,) the aggregated sites' patient counts.

    The wrapper's noise std (``sigma * C / n``) assumes each site moves the mean by at
    most C / n. With patient weights a site moves it by up to ``w_i / sum(w) * C``, so the
    largest site's multiplier is ``sigma * sum(w) / (n * max(w))``; weights are public
    (the server sees them). Adaptive clipping adds the noise with the norm AFTER its
    update, so the ratio of that to the norm the updates were clipped to enters too.
    """
    w = [float(x) for x in weights]
    share = max(w) / sum(w)
    n = strategy.num_sampled_clients
    update = strategy.noise_multiplier * clipping_norm(strategy) / (n * share * norm_clipped)
    if cfg.mode == "fixed-clipping":
        return update
    # Andrew et al.: the clipped-count release composes with the update's. Flower counts
    # uncentred bits (sensitivity 1, not the paper's 1/2), hence stddev, not 2 * stddev.
    return (update**-2 + strategy.clipped_count_stddev**-2) ** -0.5


def central_epsilon(multipliers: list[float], delta: float, n_sites: int) -> float:
    """Epsilon at ``delta`` after one Gaussian release per entry of ``multipliers``.

    Flower's RDP accountant (``dp-accounting``), used on its own rather than through the
    wrapper (see ``wrap_central_dp``); no sampling amplification: every training site is
    asked every round.
    """
    if not multipliers:
        return 0.0
    accountant = RdpAccountant(
        AccountingConfig(
            target_delta=delta,
            population_size=n_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    for sigma in multipliers:
        accountant.compose(GaussianPrivacyEvent(sigma, sample_size=n_sites, population_size=n_sites))
    return accountant.get_privacy_spent().epsilon


def central_dp_entry(
    strategy: Any,
    cfg: CentralPrivacyConfig,
    norm_clipped: float,
    per_site: dict[str, dict[str, Any]],
    released: bool,
    history: list[RoundRecord],
) -> dict[str, Any]:
    """The round's ``central_dp`` history entry; epsilon covers this and all earlier
    releases (read back from ``history``, so it survives a coordinator restart)."""
    sigma = None
    if released:
        sigma = effective_noise_multiplier(
            strategy, cfg, (m.get(wire.NUM_EXAMPLES, 0) for m in per_site.values()), norm_clipped
        )
    earlier = [
        r.central_dp["effective_noise_multiplier"]
        for r in history
        if r.central_dp and r.central_dp.get("effective_noise_multiplier") is not None
    ]
    multipliers = earlier + ([sigma] if sigma is not None else [])
    epsilon = central_epsilon(multipliers, cfg.delta, strategy.num_sampled_clients)
    return {
        "mode": cfg.mode,
        "clipping": cfg.clipping,
        "epsilon": epsilon if math.isfinite(epsilon) else math.inf,
        "delta": cfg.delta,
        "noise_multiplier": cfg.noise_multiplier,
        "effective_noise_multiplier": sigma,
        "clipping_norm": norm_clipped,
        "releases": len(multipliers),
    }


def _share_count(value: float, key: str) -> int | float:
    """Our YAML number as Flower reads it: a float <= 1 is a fraction of the sampled
    sites, anything larger an absolute count (an int to Flower)."""
    if value <= 1:
        return float(value)
    if not float(value).is_integer():
        raise ConfigError(
            f"{key}={value} is invalid: expected a fraction in (0, 1] of the sites or a whole number"
        )
    return int(value)


def secagg_workflow(cfg: SecureAggregationConfig, max_weight: float, timeout: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow for ``privacy.secagg``; its checks as ConfigErrors.

    ``max_weight`` bounds a site's weight (its patient count): each site scales its
    model by ``weight / max_weight`` before quantisation, so it should be about the
    total patient count, large enough that no site exceeds it and small enough that the
    scaled models keep their precision.
    """
    key = "privacy.secagg"
    try:
        return SecAggPlusWorkflow(
            _share_count(cfg.num_shares, f"{key}.num_shares"),
            _share_count(cfg.reconstruction_threshold, f"{key}.reconstruction_threshold"),
            max_weight=max_weight,
            clipping_range=cfg.clipping_range,
            quantization_range=cfg.quantization_range,
            timeout=timeout,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{key} settings {cfg} do not fit SecAgg+: {exc} (num_shares as a whole number "
            "must be > 2 and above reconstruction_threshold; 1.0 = every site)"
        ) from None
