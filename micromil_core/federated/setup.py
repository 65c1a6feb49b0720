"""What the coordinator checks and decides before round 1, without Flower: each site's
declaration (``SiteInfo``) checked against the others and its registered key, the global
model's spec and starting weights, the feature standardisation, and the patient-weighted
metrics a round reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from micromil_core.config import ExperimentConfig
from micromil_core.data.scaler import FeatureScaler
from micromil_core.data.site import class_order
from micromil_core.errors import CheckpointError, ConfigError, SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.aggregate import weighted_means
from micromil_core.federated.history import RunInfo
from micromil_core.federated.site_task import ModelSpec
from micromil_core.models.mhim import NAME as MHIM_NAME
from micromil_core.models.mhim import base_checkpoint_fits, state_from_base
from micromil_core.models.registry import full_params, params_from_dict
from micromil_core.runtime import seed_everything
from micromil_core.training.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class SiteInfo:
    node_id: int
    name: str
    role: str
    classes: list[str]
    counts: dict[str, int]
    problems: list[str]
    moments: tuple[torch.Tensor, torch.Tensor, int] | None = None
    # The encoder identity behind this site's features (``encoders.base.identity_label``:
    # cache id + weights SHA-256), None when the site sends none (precomputed features).
    encoder: str | None = None
    # The site's own DP-SGD (its site.yaml): "dp-sgd" or "none" (older sites say nothing).
    privacy: str = "none"


def check_identities(sites: list[SiteInfo], site_nodes: dict[int, str] | None) -> None:
    """Refuse any node whose self-declared site name is not the one its registered key is
    bound to (``site_nodes``: node id -> name, from node authentication). A name in a
    node's config is only a claim; the key is what the SuperLink verified."""
    if site_nodes is None:
        return
    refused = []
    for s in sites:
        bound = site_nodes.get(s.node_id)
        if bound is None:
            refused.append(
                f"node {s.node_id} (calling itself '{s.name}') holds no key registered at this "
                "coordinator"
            )
        elif bound != s.name:
            refused.append(
                f"node {s.node_id} holds the key registered for '{bound}' but calls itself "
                f"'{s.name}'"
            )
    if refused:
        raise SiteDataError(
            "refused before round 1, no model was sent: " + "; ".join(refused)
            + ". A hospital's site.name must equal the name its key was registered under; if "
            "it does, that hospital's private key is in someone else's hands: unregister it "
            "(`flwr supernode unregister`) and issue a new one"
        )



def validate_sites(sites: list[SiteInfo], cfg: ExperimentConfig) -> tuple[list[str], int]:
    """Checks of the sites' data before round 1; returns (classes, feature dim). Errors
    name the site. The strategy and privacy settings are checked by the Flower layer
    (``server.federation.check_sites``)."""
    names = [s.name for s in sites]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SiteDataError(f"several sites call themselves {', '.join(dupes)}; give each a unique site name")
    problems = [f"{s.name}: {p}" for s in sites for p in s.problems]
    if problems:
        raise SiteDataError(
            "site data failed `micromil check-site` (run it at the site for details):\n  "
            + "\n  ".join(problems)
        )
    train = [s for s in sites if s.role == "train"]
    if not train:
        raise SiteDataError("no training site connected; at least one site needs role=train")
    check_encoders(sites)
    dims = {s.name: s.counts.get("feature_dim") for s in sites}
    ref_site = train[0].name
    ref_dim = dims[ref_site]
    wrong = [f"{n} has {d}" for n, d in dims.items() if d != ref_dim]
    if wrong:
        raise SiteDataError(
            f"sites have different feature dimensions ({ref_site} has {ref_dim}, "
            f"{', '.join(wrong)}); all sites must use the same encoder/feature extractor"
        )
    classes = list(class_order(c for s in train for c in s.classes))
    for s in sites:
        if s.role == "train" and sorted(s.classes) != sorted(classes):
            raise SiteDataError(
                f"site {s.name} has labels {sorted(s.classes)} but the training sites together "
                f"have {classes}; every training site must use the same label names"
            )
        unknown = sorted(set(s.classes) - set(classes))
        if unknown:
            raise SiteDataError(
                f"site {s.name} has labels {unknown} that no training site has ({classes}); "
                "fix its patients.csv labels"
            )
    check_fine_classes(cfg)
    return classes, int(ref_dim)



def check_encoders(sites: list[SiteInfo]) -> None:
    """Refuse sites whose features came from different encoders (name, settings or weights
    file, as ``encoders.base.identity_label`` spells them), naming every site's encoder.

    Features of two encoders can share a dimension (two ViT-B checkpoints both give 768)
    yet mean different things; a model averaged over them learns neither. Sites that
    declare no encoder (precomputed features) are not compared.
    """
    declared = {s.name: s.encoder for s in sites if s.encoder}
    if len(set(declared.values())) <= 1:
        undeclared = sorted(s.name for s in sites if not s.encoder)
        if declared and undeclared:
            log.warning("%s declare no feature encoder (precomputed features?); all other "
                        "sites use %s", ", ".join(undeclared), next(iter(declared.values())))
        return
    groups: dict[str, list[str]] = {}
    for name, enc in declared.items():
        groups.setdefault(enc, []).append(name)
    listing = "; ".join(f"{', '.join(sorted(names))}: {enc}" for enc, names in
                        sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))
    raise SiteDataError(
        f"refused before round 1: the sites' features come from different encoders ({listing}); "
        "every site must extract its features with the same encoder and the same weights "
        "file (compare the sha256 values; `micromil extract --encoder ...` at each site)"
    )


def check_fine_classes(cfg: ExperimentConfig) -> None:
    """A model with fine classes (HMIL) needs the hierarchy in the config: the server never
    sees a label, so it cannot derive fine_to_coarse as local training does."""
    if cfg.model.name != "hmil":
        return
    mapping = params_from_dict("hmil", dict(cfg.model.params)).fine_to_coarse
    fine = cfg.data.fine_classes
    if not fine or not mapping:
        raise ConfigError(
            "model hmil in a federation needs data.fine_classes (the fine class names in index "
            "order) and model.params.fine_to_coarse (the coarse class index of each), e.g. "
            "data.fine_classes: [Coat, Pullover, Sandal], fine_to_coarse: [1, 1, 0]"
        )
    if len(mapping) != len(fine):
        raise ConfigError(
            f"model.params.fine_to_coarse has {len(mapping)} entries but data.fine_classes names "
            f"{len(fine)} fine classes; give one coarse index per fine class"
        )



def global_scaler(sites: list[SiteInfo], dim: int) -> FeatureScaler:
    """Feature standardisation from the training sites' summed moments (no raw features)."""
    total = torch.zeros(dim, dtype=torch.float64)
    total_sq = torch.zeros(dim, dtype=torch.float64)
    count = 0
    for s in sites:
        if s.role == "train" and s.moments is not None:
            total += s.moments[0]
            total_sq += s.moments[1]
            count += s.moments[2]
    if count == 0:
        return FeatureScaler.identity(dim)
    return FeatureScaler.from_moments(total, total_sq, count)



def choose_scaler_mode(cfg: ExperimentConfig, train_sites: list[SiteInfo]) -> str:
    """none | global | site (see ``FederationConfig.scaler``); says why when it matters."""
    if not cfg.train.standardize:
        return "none"
    withheld = [s.name for s in train_sites if s.moments is None]
    mode = cfg.federation.scaler
    if mode == "auto":
        mode = "site" if withheld else "global"
        if withheld:
            log.info(
                "%s keep their feature statistics (local DP): every site standardises its "
                "features with its own statistics", ", ".join(withheld),
            )
    elif mode == "global" and withheld:
        log.warning(
            "global standardisation uses only the sites that released statistics; %s did not",
            ", ".join(withheld),
        )
    return mode



def experiment_spec(cfg: ExperimentConfig, dim: int, classes: list[str]) -> ModelSpec:
    """The global model of this experiment, with every param spelled out."""
    return ModelSpec(cfg.model.name, dim, len(classes), full_params(cfg.model.name, cfg.model.params))



def starting_weights(cfg: ExperimentConfig, spec: ModelSpec, classes: list[str]) -> dict[str, torch.Tensor]:
    """Round 1's global weights: ``federation.initial_model`` if set, else the seeded init.

    The file must hold the same model (name, params, input dim) and the same classes in the
    same order, or the first round would silently train a different network. An MHIM
    federation also accepts a checkpoint of its base model with the same base params.
    """
    path = cfg.federation.initial_model
    if not path:
        return initial_model_state(spec, cfg.train.seed)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"federation.initial_model: {exc}") from None
    state = ckpt.state_dict
    ours = (spec.name, spec.in_dim, dict(spec.params), list(classes))
    if spec.name == MHIM_NAME and base_checkpoint_fits(ckpt.model_name, ckpt.params, spec.params):
        # A trained base model starts MHIM's student, and so each round's teacher: the
        # paper's "converged baseline" start, in a federation. Other tensors (recycle
        # queries) keep their seeded init.
        state = {**initial_model_state(spec, cfg.train.seed), **state_from_base(state)}
        ours = (ckpt.model_name, spec.in_dim, dict(spec.params["base_params"]), list(classes))
    theirs = (ckpt.model_name, ckpt.in_dim, full_params(ckpt.model_name, ckpt.params), list(ckpt.classes))
    for what, a, b in zip(("model", "feature dim", "model params", "classes"), theirs, ours, strict=True):
        if a != b:
            raise ConfigError(
                f"federation.initial_model {path}: its {what} {a!r} differ from this "
                f"federation's {b!r}; train the starting model with the same model "
                "section and classes, or remove federation.initial_model"
            )
    expected = {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        odd = sorted(set(found.items()) ^ set(expected.items()))[:4]
        raise ConfigError(
            f"federation.initial_model {path}: its weights do not fit this model "
            f"(first differences: {odd}); re-save it from a run of this model"
        )
    log.info("round 1 starts from %s", path)
    return {k: v.detach().clone() for k, v in state.items()}



def initial_model_state(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Seeded initial weights. Data-dependent init uses N(0, I) samples in the
    standardised feature space: no site's data is needed (or sent) to start."""
    seed_everything(seed)
    model = spec.build()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 512, spec.in_dim, generator=gen)
    model.init_from_data(x, torch.ones(1, 512, dtype=torch.bool), generator=gen)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}



def weighted_site_metrics(per_site: dict[str, dict[str, Any]], keys: Iterable[str]) -> dict[str, Any]:
    """Patient-weighted mean of per-site metrics (``weighted_means``), with a hierarchical
    model's fine metrics added when the sites report them.

    A metric that no site reports because the sites withheld it (small-count guard) is
    listed under ``suppressed`` (with the strictest ``min_patients``) instead of a NaN.
    """
    if any(wire.FINE_COUNT in m for m in per_site.values()):
        keys = (*keys, *wire.FINE_METRIC_KEYS)
    out: dict[str, Any] = weighted_means(per_site.values(), keys)
    withheld = sorted(
        k for k, v in out.items()
        if math.isnan(v) and any(k in m.get(wire.SUPPRESSED, []) for m in per_site.values())
    )
    if withheld:
        for k in withheld:
            del out[k]
        out[wire.SUPPRESSED] = withheld
        out[wire.MIN_PATIENTS] = max(int(m.get(wire.MIN_PATIENTS, 0)) for m in per_site.values())
    return out



def run_info(cfg: ExperimentConfig, sites: list[SiteInfo], started: str) -> RunInfo:
    """The run's header in history.json (``started``: when round 1 began, ISO 8601 UTC)."""
    return RunInfo(
        model=cfg.model.name,
        strategy=cfg.federation.strategy,
        rounds=cfg.federation.rounds,
        local_epochs=cfg.federation.local_epochs,
        seed=cfg.train.seed,
        train_sites=[s.name for s in sites if s.role == "train"],
        holdout_sites=[s.name for s in sites if s.role == "holdout"],
        started=started,
    )



def federated_checkpoint(
    cfg: ExperimentConfig, spec: ModelSpec, classes: list[str], state: dict[str, torch.Tensor],
    scaler: FeatureScaler | None, provenance: dict[str, Any],
) -> Checkpoint:
    """A model of this federation as a checkpoint: the global one the coordinator saves, or
    a site's personal one (``federated.personalise``)."""
    return Checkpoint(
        model_name=spec.name, in_dim=spec.in_dim, n_classes=spec.n_classes, params=spec.params,
        classes=list(classes), state_dict={k: v.detach().cpu() for k, v in state.items()},
        scaler=scaler, encoder=cfg.data.encoder, fine_classes=list(cfg.data.fine_classes) or None,
        config=cfg.to_dict(), provenance=provenance,
    )
