"""Privacy settings of an experiment and of a site: local DP-SGD per patient, the
small-count guard, central DP and secure aggregation (the ``privacy:`` section; a
hospital's site.yaml uses ``LocalPrivacyConfig``). Read through ``micromil_core.config``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from micromil_core.errors import ConfigError
from micromil_core.typed_values import require as _require

LOCAL_DP_MODES = ("none", "dp-sgd")
# Statistical disclosure control: the fewest patients a reported metric may be computed
# over, unless a federation explicitly accepts less (privacy.allow_small_counts).
MIN_PATIENTS_FLOOR = 5
ACCOUNTANTS = ("rdp", "prv", "gdp")
CENTRAL_DP_MODES = ("none", "fixed-clipping", "adaptive-clipping")
CLIPPING_SIDES = ("server", "client")


@dataclass(frozen=True)
class LocalPrivacyConfig:
    """DP-SGD at a site, with one PATIENT (bag) as the privacy unit.

    In a deployment each hospital sets this in its own site.yaml (``privacy:``); in a
    simulation the experiment's ``privacy:`` keys apply to every simulated training site.
    """

    mode: str = "none"  # none | dp-sgd
    # Total budget over the whole run (all rounds). With noise_multiplier 0 the noise is
    # calibrated so the planned rounds spend exactly this; the site stops contributing
    # when its next round would exceed it.
    target_epsilon: float = 0.0
    delta: float = 1e-5  # must be < 1 / patients at the site
    max_grad_norm: float = 1.0  # per-patient gradient clipping bound C
    noise_multiplier: float = 0.0  # sigma (noise std = sigma * C); 0 = from target_epsilon
    sample_rate: float = 0.0  # Poisson rate per step; 0 = train.batch_size / training patients
    accountant: str = "rdp"  # Opacus accountant: rdp | prv | gdp
    # Small-count guard (privacy.disclosure): no metric over fewer patients leaves a site.
    # It applies whether or not DP-SGD is on; the stricter of coordinator and site wins.
    min_patients: int = MIN_PATIENTS_FLOOR
    allow_small_counts: bool = False  # must be true to set min_patients below the floor

    def __post_init__(self) -> None:
        _require(self.min_patients >= 1, "privacy.min_patients", self.min_patients, ">= 1")
        if self.min_patients < MIN_PATIENTS_FLOOR and not self.allow_small_counts:
            raise ConfigError(
                f"privacy.min_patients={self.min_patients} is below {MIN_PATIENTS_FLOOR}: metrics "
                "over so few patients can reveal one patient's outcome. Keep the default, or "
                "confirm with privacy.allow_small_counts: true"
            )
        _require(self.mode in LOCAL_DP_MODES, "privacy.mode", self.mode, f"one of {LOCAL_DP_MODES}")
        _require(
            self.accountant in ACCOUNTANTS, "privacy.accountant", self.accountant, f"one of {ACCOUNTANTS}"
        )
        _require(
            self.target_epsilon >= 0 and math.isfinite(self.target_epsilon),
            "privacy.target_epsilon", self.target_epsilon, "a positive number (0 = no budget)",
        )
        _require(0.0 < self.delta < 1.0, "privacy.delta", self.delta, "in (0, 1), e.g. 1e-5")
        _require(
            self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm),
            "privacy.max_grad_norm", self.max_grad_norm, "a positive clipping bound, e.g. 1.0",
        )
        _require(self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, ">= 0")
        _require(0.0 <= self.sample_rate <= 1.0, "privacy.sample_rate", self.sample_rate, "in [0, 1]")
        if self.enabled and self.target_epsilon == 0 and self.noise_multiplier == 0:
            raise ConfigError(
                "privacy.mode=dp-sgd needs a budget or a noise level: set privacy.target_epsilon "
                "(e.g. 8.0) or privacy.noise_multiplier (e.g. 1.0)"
            )

    @property
    def enabled(self) -> bool:
        return self.mode == "dp-sgd"


@dataclass(frozen=True)
class CentralPrivacyConfig:
    """Central DP at the server (Flower's DP strategy wrappers): the privacy unit is a
    SITE's whole update, the noise is added once to the aggregate."""

    mode: str = "none"  # none | fixed-clipping | adaptive-clipping
    noise_multiplier: float = 0.0  # sigma; noise std on the sum = sigma * clipping norm
    clipping_norm: float = 0.0  # fixed-clipping: bound on each site's update norm
    clipping: str = "server"  # where updates are clipped: server | client (needed with SecAgg+)
    delta: float = 1e-5  # delta at which the accountant reports epsilon
    # adaptive-clipping (Andrew et al. 2021): the norm tracks a quantile of update norms
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    # Unset, Flower 1.41 takes sites / 20 and refuses noise_multiplier >= 2 x that, so with
    # a handful of sites any useful noise fails (flwr.supercore.differential_privacy).
    clipped_count_stddev: float = 1.0

    def __post_init__(self) -> None:
        key = "privacy.central"
        _require(self.mode in CENTRAL_DP_MODES, f"{key}.mode", self.mode, f"one of {CENTRAL_DP_MODES}")
        _require(self.clipping in CLIPPING_SIDES, f"{key}.clipping", self.clipping, f"one of {CLIPPING_SIDES}")
        _require(self.noise_multiplier >= 0, f"{key}.noise_multiplier", self.noise_multiplier, ">= 0")
        _require(self.clipping_norm >= 0, f"{key}.clipping_norm", self.clipping_norm, ">= 0")
        _require(0.0 < self.delta < 1.0, f"{key}.delta", self.delta, "in (0, 1)")
        _require(self.initial_clipping_norm > 0, f"{key}.initial_clipping_norm", self.initial_clipping_norm, "> 0")
        _require(
            0.0 <= self.target_clipped_quantile <= 1.0,
            f"{key}.target_clipped_quantile", self.target_clipped_quantile, "in [0, 1]",
        )
        _require(self.clip_norm_lr > 0, f"{key}.clip_norm_lr", self.clip_norm_lr, "> 0")
        _require(self.clipped_count_stddev >= 0, f"{key}.clipped_count_stddev", self.clipped_count_stddev, ">= 0")
        if self.mode == "fixed-clipping" and self.clipping_norm == 0:
            raise ConfigError(
                f"{key}.mode=fixed-clipping adds noise scaled to a clipping bound, but "
                f"{key}.clipping_norm is 0; set it (e.g. 1.0)"
            )
        if self.enabled and self.noise_multiplier == 0:
            raise ConfigError(
                f"{key}.mode={self.mode} with noise_multiplier 0 clips but gives no privacy; "
                f"set {key}.noise_multiplier (e.g. 1.0) or mode: none"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ (Bell et al. 2020) options; see ``flwr.server.workflow.SecAggPlusWorkflow``."""

    num_shares: float = 1.0  # secret shares per site: an int, or a fraction of the sites
    reconstruction_threshold: float = 1.0  # shares needed to unmask: an int or a fraction
    clipping_range: float = 8.0  # update values are clipped to +-this before quantisation
    quantization_range: int = 4194304  # 2^22 levels over the clipping range
    timeout: float = 0.0  # seconds per protocol stage; 0 = federation.round_timeout

    def __post_init__(self) -> None:
        key = "privacy.secagg"
        _require(self.num_shares > 0, f"{key}.num_shares", self.num_shares, "> 0")
        _require(
            self.reconstruction_threshold > 0, f"{key}.reconstruction_threshold",
            self.reconstruction_threshold, "> 0",
        )
        _require(self.clipping_range > 0, f"{key}.clipping_range", self.clipping_range, "> 0")
        _require(self.quantization_range >= 2, f"{key}.quantization_range", self.quantization_range, ">= 2")
        _require(self.timeout >= 0, f"{key}.timeout", self.timeout, ">= 0")


@dataclass(frozen=True)
class PrivacyConfig(LocalPrivacyConfig):
    """The experiment's ``privacy:`` section: local DP-SGD keys (simulated sites), plus
    the coordinator's central DP and secure aggregation."""

    central: CentralPrivacyConfig = field(default_factory=CentralPrivacyConfig)
    secure_aggregation: bool = False
    secagg: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.secure_aggregation and self.central.enabled and self.central.clipping == "server":
            raise ConfigError(
                "privacy.secure_aggregation hides each site's update from the server, so the "
                "server cannot clip it: set privacy.central.clipping: client"
            )

    @property
    def local(self) -> LocalPrivacyConfig:
        return LocalPrivacyConfig(
            **{f.name: getattr(self, f.name) for f in fields(LocalPrivacyConfig)}
        )
