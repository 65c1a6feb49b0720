"""Experiment settings as frozen dataclasses, parsed once from YAML and ``--set`` overrides.

A YAML file mirrors the dataclasses::

    model: {name: micromil, params: {n_clusters: 36, edge_mode: paper}}
    train: {epochs: 50, lr: 1.0e-4, weight_decay: 1.0e-6, seed: 0}
    data:  {encoder: histo-texture}

``--set train.lr=3e-4 model.params.top_k=3`` overrides single keys; values are parsed as
YAML scalars. Unknown keys and bad values raise ``ConfigError`` naming the key and the fix.
Model params are validated against the model's own params dataclass by the model registry.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from micromil_core.errors import ConfigError
from micromil_core.privacy.settings import (
    ACCOUNTANTS as ACCOUNTANTS,
)
from micromil_core.privacy.settings import (
    CENTRAL_DP_MODES as CENTRAL_DP_MODES,
)
from micromil_core.privacy.settings import (
    CLIPPING_SIDES as CLIPPING_SIDES,
)
from micromil_core.privacy.settings import (  # re-exported: every section is read from here
    LOCAL_DP_MODES as LOCAL_DP_MODES,
)
from micromil_core.privacy.settings import (
    MIN_PATIENTS_FLOOR as MIN_PATIENTS_FLOOR,
)
from micromil_core.privacy.settings import (
    CentralPrivacyConfig as CentralPrivacyConfig,
)
from micromil_core.privacy.settings import (
    LocalPrivacyConfig as LocalPrivacyConfig,
)
from micromil_core.privacy.settings import (
    PrivacyConfig as PrivacyConfig,
)
from micromil_core.privacy.settings import (
    SecureAggregationConfig as SecureAggregationConfig,
)
from micromil_core.tracking import TrackingConfig
from micromil_core.typed_values import coerce, hints
from micromil_core.typed_values import require as _require

DEVICES = ("auto", "cpu", "cuda")
SELECTION_METRICS = ("loss", "auc")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class ModelConfig:
    """Which MIL model to build and its hyper-parameters (see ``micromil models``)."""

    name: str = "micromil"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Local training. Defaults follow the MicroMIL authors: Adam lr 1e-4, weight decay
    1e-6, one patient per step, up to 50 epochs (METHODS.md)."""

    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 1e-6
    batch_size: int = 1
    # adam (the authors') or sgd with momentum. Under DP-SGD, Adam's per-coordinate
    # normalisation turns noise-only coordinates into full-size steps; SGD keeps them small.
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    patience: int = 10  # epochs without validation improvement before stopping; 0 = never
    min_epochs: int = 5  # early stopping is not considered before this epoch
    val_fraction: float = 0.2  # used only when a site has no split column
    select_on: str = "loss"  # validation criterion for model selection: loss | auc
    # After selecting the epoch count on validation, retrain from scratch on training +
    # validation patients for that many epochs (uses every patient; small cohorts gain).
    refit: bool = False
    class_weighting: bool = True  # inverse-frequency class weights in the loss
    standardize: bool = True  # z-score features with statistics of the training bags
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only; ignored on CPU
    num_threads: int = 0  # torch intra-op threads; 0 = torch default

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "a positive number")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.patience >= 0, "train.patience", self.patience, ">= 0 (0 disables)")
        _require(self.min_epochs >= 0, "train.min_epochs", self.min_epochs, ">= 0")
        _require(
            0.0 < self.val_fraction < 1.0, "train.val_fraction", self.val_fraction, "in (0, 1)"
        )
        _require(
            self.select_on in SELECTION_METRICS,
            "train.select_on",
            self.select_on,
            f"one of {SELECTION_METRICS}",
        )
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 disables)")
        _require(self.device in DEVICES, "train.device", self.device, f"one of {DEVICES}")
        _require(self.num_threads >= 0, "train.num_threads", self.num_threads, ">= 0")
        _require(
            self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, f"one of {OPTIMIZERS}"
        )
        _require(0.0 <= self.momentum < 1.0, "train.momentum", self.momentum, "in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    """Where instance features come from.

    encoder: None/"" reads precomputed SITE/features/; an encoder name (``micromil
    extract --help``) extracts features from SITE/images/ once and reuses the cache.
    """

    encoder: str | None = None
    encoder_weights: str | None = None  # local weights file for timm:/torchvision: encoders
    encoder_input_size: int = 0  # network input size for external encoders; 0 = default
    batch_size: int = 64  # images per encoder forward pass
    # Multi-scale images (MRAN, docs/multiscale.md), the same at every site of a federation:
    # crop fractions encoded per image (e.g. (1.0, 0.5)); () = the whole image only.
    crop_scales: tuple[float, ...] = ()
    # magnification folder names in index order (e.g. 40X,100X,200X,400X); () = found
    # per site, which is only safe when every site has every magnification.
    scales: tuple[str, ...] = ()
    # Class names in index order; a label outside them is an error naming its row. () = the
    # sites' sorted labels (one carried by a single patient is refused as a likely typo).
    classes: tuple[str, ...] = ()
    # The federation's fine class names in index order (HMIL's fine_label column); () = the
    # sites' own sorted fine labels, which only a single-site run can rely on.
    fine_classes: tuple[str, ...] = ()
    # Extraction from images/ (the same options as `micromil extract`, so `train --encoder`
    # builds the same feature cache): tile side in pixels (None = the encoder's default,
    # 0 = no tiling; slide files are always tiled) and overlap; DataLoader processes
    # decoding images; mixed precision on CUDA.
    tile_size: int | None = None
    tile_overlap: int = 0
    workers: int = 0
    amp: bool = False
    # "macenko:REF.png" or "reinhard:REF.png": stain normalisation towards one reference
    # image (the same file at every site); "" = off. Part of the feature cache's id.
    stain_normalise: str = ""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        _require(
            self.tile_size is None or self.tile_size == 0 or self.tile_size >= 8,
            "data.tile_size", self.tile_size,
            "an integer >= 8 pixels, 0 (no tiling) or null (the encoder's default)",
        )
        _require(
            self.tile_overlap >= 0 and (not self.tile_size or self.tile_overlap < self.tile_size),
            "data.tile_overlap", self.tile_overlap,
            f"pixels in [0, data.tile_size) = [0, {self.tile_size})" if self.tile_size
            else "pixels >= 0, less than the tile size",
        )
        _require(self.workers >= 0, "data.workers", self.workers,
                 "an integer >= 0 (0 = decode images in the main process)")
        self._check_stain()
        _require(
            not self.classes or (len(self.classes) >= 2 and len(set(self.classes)) == len(self.classes)),
            "data.classes", self.classes, "two or more distinct class names, e.g. [negative, positive]",
        )
        _require(
            all(0.0 < c <= 1.0 for c in self.crop_scales),
            "data.crop_scales", self.crop_scales, "fractions in (0, 1], e.g. [1.0, 0.5]",
        )
        _require(
            self.encoder_input_size >= 0,
            "data.encoder_input_size",
            self.encoder_input_size,
            ">= 0 (0 = the encoder's default)",
        )

    def _check_stain(self) -> None:
        """The spec's form only: the reference file is read where features are extracted."""
        spec = self.stain_normalise.strip()
        if not spec or spec.lower() == "none":
            return
        from micromil_core.encoders.stain import METHODS  # light: numpy only

        method, sep, path = spec.partition(":")
        _require(
            bool(sep and path.strip()) and method.strip().lower() in METHODS,
            "data.stain_normalise", self.stain_normalise,
            f"'<method>:<reference image>' with method in {{{', '.join(METHODS)}}}, e.g. "
            "macenko:/data/reference.png ('' = off)",
        )
        # It changes images before they are encoded: precomputed features cannot be normalised.
        _require(bool(self.encoder), "data.stain_normalise", self.stain_normalise,
                 "set together with an encoder (--encoder / data.encoder); precomputed "
                 "features cannot be stain-normalised, extract them again with "
                 "`micromil extract --stain-normalise`")

    def extraction_options(self) -> dict[str, Any]:
        """Keyword options for ``extract_site_features`` besides the site and encoder."""
        return {
            "batch_size": self.batch_size,
            "crop_scales": self.crop_scales or None,
            "scale_names": self.scales or None,
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "workers": self.workers,
            "amp": self.amp,
            "stain_normalise": self.stain_normalise or None,
        }

    def encoder_options(self) -> dict[str, Any]:
        """Keyword options for ``get_encoder`` (only those that are set)."""
        opts: dict[str, Any] = {}
        if self.encoder_weights:
            opts["weights"] = self.encoder_weights
        if self.encoder_input_size:
            opts["input_size"] = self.encoder_input_size
        return opts


STRATEGIES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
    "fedmedian", "fedtrimmedavg", "krum",
)
SELECT_ROUND = ("last", "best-val")
SCALER_MODES = ("auto", "global", "site")
TRANSPORTS = ("float32", "float16")  # federation.transport (federated/transport.py)
# federation.personalise (federated/personalise.py): what each training site makes of the
# final global model for its own patients; the personal model never leaves the site.
PERSONAL_METHODS = ("finetune", "proximal", "local-head")
PERSONALISE_METHODS = ("none", *PERSONAL_METHODS)
PERSONAL_RULES = ("one-se", "best")  # federation.personal_rule (federated/personal_cv.py)


@dataclass(frozen=True)
class FederationConfig:
    """Federation-wide settings (the coordinator's). ``train`` holds the local optimiser."""

    rounds: int = 20
    local_epochs: int = 1
    strategy: str = "fedavg"
    # Extra keyword arguments of the Flower strategy, e.g. {proximal_mu: 0.01} for
    # fedprox, {eta: 0.01} for fedadam, {beta: 0.2} for fedtrimmedavg.
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    min_train_sites: int = 0  # sites that must reply for a round to count; 0 = all of them
    round_timeout: float = 600.0  # seconds to wait for replies in one round
    # A site's update is refused when ||w_site - w_global|| exceeds this many times
    # ||w_global|| (a scaled or exploded update); 0 = no bound. See docs/security.md.
    max_update_ratio: float = 10.0
    select: str = "last"  # final model: last round, or best aggregated validation loss
    # Feature standardisation (with train.standardize): "global" = statistics summed over
    # the training sites; "site" = every site (held-out ones too) uses its own, which then
    # never leave it; "auto" = global unless a training site withholds its statistics
    # (sites with local DP do).
    scaler: str = "auto"
    # A micromil model.pt whose weights start round 1 instead of the seeded data-free init,
    # e.g. a model trained on a public cohort. Under local DP this is the strongest lever we
    # measured (benchmarks/results/privacy_public_init.md). It is read on the coordinator
    # only; its model, params and classes must match this experiment. Empty = no file.
    initial_model: str = ""
    # "float16" halves what each site uploads per round (federated/transport.py); the
    # global model always travels at full precision.
    transport: str = "float32"
    # A personal model per training site, kept at the site (docs/personalisation.md):
    # "finetune" the final global model on the site's patients, "proximal" the same with
    # (personal_mu / 2) ||w - w_global||^2 (Ditto's personal objective), "local-head" a
    # classifier head trained at the site every round that never leaves it.
    personalise: str = "none"
    personal_epochs: int = 20  # at most; the epoch count is chosen at the site, never on test
    personal_mu: float = 0.1
    # finetune / proximal choose their epoch count by k-fold CV over the site's training and
    # validation patients (federated/personal_cv.py): one small validation split decided
    # too little. 0 = choose on the validation split. Fewer folds when a class is smaller.
    personal_folds: int = 5
    # Which CV epoch count wins: "one-se" the fewest epochs (the global model first) whose
    # mean fold score is within one standard error of the best one's, the error of their
    # paired per-fold difference (Breiman's one-standard-error rule): a hospital changes
    # models only for a gain larger than the folds' noise. "best": the best mean score.
    personal_rule: str = "one-se"

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "federation.rounds", self.rounds, "an integer >= 1")
        _require(self.personalise in PERSONALISE_METHODS, "federation.personalise", self.personalise,
                 f"one of {', '.join(PERSONALISE_METHODS)}")
        _require(self.personal_epochs >= 1, "federation.personal_epochs", self.personal_epochs, ">= 1")
        _require(self.personal_mu >= 0 and math.isfinite(self.personal_mu), "federation.personal_mu",
                 self.personal_mu, ">= 0")
        _require(self.personal_folds == 0 or self.personal_folds >= 2, "federation.personal_folds",
                 self.personal_folds, "0 (the validation split) or >= 2")
        _require(self.personal_rule in PERSONAL_RULES, "federation.personal_rule", self.personal_rule,
                 f"one of {', '.join(PERSONAL_RULES)}")
        _require(self.transport in TRANSPORTS, "federation.transport", self.transport, f"one of {TRANSPORTS}")
        _require(
            self.local_epochs >= 1, "federation.local_epochs", self.local_epochs, ">= 1"
        )
        _require(
            self.strategy in STRATEGIES,
            "federation.strategy",
            self.strategy,
            f"one of {', '.join(STRATEGIES)}",
        )
        _require(self.min_train_sites >= 0, "federation.min_train_sites", self.min_train_sites, ">= 0")
        _require(self.round_timeout > 0, "federation.round_timeout", self.round_timeout, "> 0 seconds")
        _require(
            self.max_update_ratio >= 0 and math.isfinite(self.max_update_ratio),
            "federation.max_update_ratio", self.max_update_ratio, ">= 0 (0 = no bound)",
        )
        _require(self.select in SELECT_ROUND, "federation.select", self.select, f"one of {SELECT_ROUND}")
        _require(self.scaler in SCALER_MODES, "federation.scaler", self.scaler, f"one of {SCALER_MODES}")


SIMULATION_ENGINES = ("in-process", "superlink")


@dataclass(frozen=True)
class SimulationConfig:
    """Which site folders a one-machine simulation runs (``micromil simulate``)."""

    data_root: str | None = None
    train_sites: tuple[str, ...] = ()  # names in ROOT/sites.yaml; empty = its training sites
    holdout_sites: tuple[str, ...] = ()  # empty = its held-out sites
    cpus_per_site: float = 1.0  # Ray resources per simulated site
    gpus_per_site: float = 0.0  # e.g. 0.25: four simulated sites share one GPU
    # An existing Ray cluster ("127.0.0.1:6379"); "" = a private Ray on this machine.
    ray_address: str = ""
    # "superlink": Flower's supported path, `flwr run` on a private SuperLink in simulation
    # mode (server/simulation_superlink.py); "in-process": Flower's deprecated run_simulation
    # in this process, needed by tests that audit every message in process. Same apps, same
    # weights (tests/integration/test_simulation.py); both join ray_address when it is set.
    engine: str = "superlink"

    def __post_init__(self) -> None:
        _require(self.cpus_per_site > 0, "simulation.cpus_per_site", self.cpus_per_site, "> 0")
        _require(self.gpus_per_site >= 0, "simulation.gpus_per_site", self.gpus_per_site, ">= 0")
        _require(self.engine in SIMULATION_ENGINES, "simulation.engine", self.engine,
                 f"one of {', '.join(SIMULATION_ENGINES)}")


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # micromil_core.tracking

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"]["params"] = dict(self.model.params)
        out["federation"]["strategy_params"] = dict(self.federation.strategy_params)
        out["simulation"]["train_sites"] = list(self.simulation.train_sites)
        out["simulation"]["holdout_sites"] = list(self.simulation.holdout_sites)
        return out


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "federation": FederationConfig,
    "simulation": SimulationConfig,
    "privacy": PrivacyConfig,
    "tracking": TrackingConfig,
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {data!r}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (returns a new dict)."""
    out = copy.deepcopy(dict(raw))  # the caller's dict stays as it was
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        keys = [k.strip() for k in dotted.split(".")]
        if len(keys) < 2 or not all(keys):
            raise ConfigError(
                f"--set {item!r}: the key must name a section and a field, e.g. train.lr=3e-4"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = out
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def build_section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
            f"valid keys of {name!r}: {', '.join(sorted(valid))}"
        )
    kwargs = {}
    types = hints(cls)
    for key, value in values.items():
        if dataclasses.is_dataclass(types[key]):  # a nested section, e.g. privacy.central
            kwargs[key] = build_section(f"{name}.{key}", types[key], value)
        else:
            kwargs[key] = coerce(f"{name}.{key}", types[key], value)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"config section {name!r}: {exc}") from None


def build_config(raw: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Validate a nested dict (YAML + overrides) into an ``ExperimentConfig``."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}"
        )
    parts = {name: build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    return ExperimentConfig(**parts)


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = ()
) -> ExperimentConfig:
    """YAML file (optional) + ``--set`` overrides -> validated ``ExperimentConfig``."""
    raw = load_yaml(path) if path else {}
    return build_config(apply_overrides(raw, overrides))


def check_model_params(cfg: ExperimentConfig) -> None:
    """Refuse a wrong model name or param (the model registry's check; it imports torch,
    hence not part of ``load_config``)."""
    from micromil_core.models.registry import params_from_dict

    params_from_dict(cfg.model.name, dict(cfg.model.params))
