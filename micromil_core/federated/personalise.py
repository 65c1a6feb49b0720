"""A model for each hospital: a training site's personal model, made from the global model
and kept at the site (``federation.personalise``; docs/personalisation.md).

Methods:

- ``finetune``: the final global model trained further on the site's training patients;
- ``proximal``: the same with ``(personal_mu / 2) ||w - w_global||^2`` added to the loss
  (Ditto's personal objective, solved once from the final global model);
- ``local-head``: the model's classifier head (``MILModel.head_modules``) is the site's
  own. Every round, after the site trains the global model, it trains its head on the body
  it just trained (the body frozen) and keeps it; the global model, with the generic head
  all sites train together, is what travels. At the end the head is trained on the final
  global body. Held-out sites are served by the global model, as under every method.

Whatever the method, the candidates (each fine-tuning epoch count) and the global model
itself are judged without the site's test patients, and the best one is kept, so a site
whose patients the global model already serves best keeps it (``personal_epoch`` 0):
``finetune`` and ``proximal`` by k-fold CV over the site's training and validation patients
(``personal_cv``), ``local-head`` and DP-SGD sites on the validation patients. The test
split is never read here. The personal model is saved as a checkpoint in the site's own
folder and only aggregate numbers, withheld below the small-count guard, leave the site.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from micromil_core.config import PERSONAL_METHODS, ExperimentConfig, TrainConfig
from micromil_core.data.bag import Bag
from micromil_core.data.scaler import FeatureScaler, scale_bags
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.personal_cv import cv_fine_tuning, score_on, usable_folds
from micromil_core.io import torch_save_atomic, write_json_atomic
from micromil_core.models.base import MILModel
from micromil_core.privacy.disclosure import guard
from micromil_core.runtime import seed_everything

if TYPE_CHECKING:
    from micromil_core.federated.messages import RoundSettings
    from micromil_core.federated.site_task import ModelSpec, SiteRuntime, SiteSettings

log = logging.getLogger(__name__)

# Methods whose fine-tuning is one more pass of local training after the last round: under
# DP-SGD the site's noise is calibrated for it (``planned_rounds``) and its ledger records it.
FINE_TUNING = ("finetune", "proximal")
MODEL_FILE = "model.pt"
MADE_FROM_FILE = "made-from.json"


def planned_rounds(cfg: ExperimentConfig) -> int:
    """Rounds of local training a site plans its DP-SGD budget over: the federation's, plus
    the personal fine-tuning when there is one."""
    return cfg.federation.rounds + (cfg.federation.personalise in FINE_TUNING)


def head_keys(model: MILModel) -> list[str]:
    """State-dict keys of the model's classifier head (``head_modules``)."""
    prefixes = tuple(f"{m}." for m in model.head_modules)
    keys = [k for k in model.state_dict() if k.startswith(prefixes)]
    if not keys:
        raise ConfigError(
            f"model {type(model).__name__} names no classifier head ({model.head_modules}); "
            "use federation.personalise: finetune or proximal with it"
        )
    return keys


class PersonalStore:
    """One run's personal state in the site's own folder: ``STATE/personal/<run id>/``
    (the head of every round under ``local-head``, the personal model, and what it was made
    from)."""

    def __init__(self, state_dir: Path | None, run_id: str, site: str) -> None:
        if state_dir is None:
            raise SiteDataError(
                f"site {site}: personalisation keeps the personal model in the site's state "
                "folder; set supernode.state_dir in site.yaml"
            )
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id or "default")
        self.root = Path(state_dir) / "personal" / safe

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    def _head_path(self, server_round: int) -> Path:
        return self.root / f"head-round-{server_round:04d}.pt"

    def _head_rounds(self) -> list[int]:
        return sorted(int(p.stem.rsplit("-", 1)[1]) for p in self.root.glob("head-round-*.pt"))

    def save_head(self, server_round: int, head: dict[str, torch.Tensor]) -> None:
        """Keep round ``server_round``'s head (atomically) and the newest one before it: a
        resumed coordinator may replay the round, which then starts from that one (even if
        this site sat out the round before)."""
        torch_save_atomic({k: v.detach().cpu() for k, v in head.items()}, self._head_path(server_round))
        earlier = [r for r in self._head_rounds() if r < server_round]
        for r in earlier[:-1]:
            self._head_path(r).unlink(missing_ok=True)

    def head_before(self, server_round: int) -> dict[str, torch.Tensor] | None:
        """The head saved by the latest round before ``server_round``, if any."""
        rounds = [r for r in self._head_rounds() if r < server_round]
        if not rounds:
            return None
        return torch.load(self._head_path(rounds[-1]), map_location="cpu", weights_only=True)

    def made_from(self, global_sha: str, how: dict[str, Any]) -> dict[str, Any] | None:
        """The reply of a personal model already made here from this global model, the same
        way (``how``: method and its settings); a coordinator that restarts during
        personalisation asks again, and DP budget is not spent twice. Else None."""
        path = self.root / MADE_FROM_FILE
        if not (path.is_file() and self.model_path.is_file()):
            return None
        saved = json.loads(path.read_text())
        same = saved.get("global_sha256") == global_sha and saved.get("how") == how
        return saved["metrics"] if same else None

    def record(self, global_sha: str, how: dict[str, Any], metrics: dict[str, Any]) -> None:
        write_json_atomic(self.root / MADE_FROM_FILE,
                          {"global_sha256": global_sha, "how": how, "metrics": metrics})


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of a model's weights (names, shapes and values)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def only_head_trains(model: MILModel):
    """Freeze every parameter but the classifier head's for the duration."""
    keys = set(head_keys(model))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in keys and flags[name])
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def with_head(state: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``state`` with its head replaced by ``head`` (unchanged without one)."""
    return {**state, **(head or {})}


def last_round_span(cfg: ExperimentConfig) -> tuple[float, float]:
    """The training progress fine-tuning runs at: the last round's. A model's schedules
    then weigh its losses as they did at the end of training (at progress 1 exactly,
    HMIL's curriculum switches its coarse loss off)."""
    rounds = cfg.federation.rounds
    return (rounds - 1) / rounds, 1.0


def train_local_head(
    model: MILModel, bags: list[Bag], val: list[Bag], cfg: TrainConfig, epochs: int,
    device: torch.device, span: tuple[float, float],
) -> Any:
    """Train the head alone on ``bags`` (selected on ``val`` when given); returns fit's result."""
    from micromil_core.training.trainer import fit

    with only_head_trains(model):
        return fit(model, bags, val, cfg, device, epochs=epochs, progress_span=span)


def keep_local_head(
    runtime: SiteRuntime, spec: ModelSpec, trained: dict[str, torch.Tensor], cfg: ExperimentConfig,
    scaler: FeatureScaler | None, server_round: int, local_epochs: int, device: torch.device,
    run_id: str,
) -> None:
    """Under ``local-head``, after round ``server_round``'s local training: the site's own
    head, from the one it kept before, trained on the body it has just trained, and kept."""
    from micromil_core.federated.site_task import round_seed

    site = runtime.settings
    bags = scale_bags(runtime.train, scaler)
    store = PersonalStore(site.state_dir, run_id, site.name)
    model = spec.build(trained).to(device)
    model.load_state_dict(with_head(model.state_dict(), store.head_before(server_round)))
    rounds = cfg.federation.rounds
    seed = round_seed(cfg.train.seed, server_round, f"{site.name}/head")
    train_local_head(model, bags, [], replace(cfg.train, seed=seed), local_epochs, device,
                     ((server_round - 1) / rounds, server_round / rounds))
    state = model.state_dict()
    store.save_head(server_round, {k: state[k] for k in head_keys(model)})


def personalise_site(
    runtime: SiteRuntime, spec: ModelSpec, global_state: dict[str, torch.Tensor], cfg: ExperimentConfig,
    scaler: FeatureScaler | None, device: torch.device, run_id: str, min_patients: int,
    schedule: tuple[int, int] | None = None,
) -> tuple[MILModel, int, dict[str, Any]]:
    """The site's personal model from the final global model, chosen without its test
    patients: by k-fold CV over its training and validation patients (``personal_cv``,
    fine-tuning methods without DP-SGD) or on its validation patients; returns (model, its
    fine-tuning epoch (0: the global model was best), reply metrics: aggregate, guarded).
    ``schedule``: (the round this step is, rounds its DP-SGD plans for); default the round
    after the federation's last."""
    from micromil_core.federated.site_task import round_seed

    site, fed = runtime.settings, cfg.federation
    start = time.perf_counter()
    train, val = scale_bags(runtime.train, scaler), scale_bags(runtime.val, scaler)
    schedule = schedule or (fed.rounds + 1, planned_rounds(cfg))
    seed = round_seed(cfg.train.seed, schedule[0], site.name)
    seed_everything(seed)
    train_cfg = replace(cfg.train, seed=seed)
    cv_ready = fed.personalise in FINE_TUNING and not site.privacy.enabled
    folds = usable_folds([b.label for b in train + val], fed.personal_folds) if cv_ready else 0
    if cv_ready and fed.personal_folds >= 2 and not folds:
        log.info("site %s: too few patients of a class for %d-fold CV; the personal model is "
                 "chosen on the validation patients", site.name, fed.personal_folds)
    metrics: dict[str, Any] = {}
    if folds:
        judged = train + val
        model, chosen_epoch, aucs = _chosen_by_cv(spec, global_state, cfg, judged, train_cfg, folds, device)
        metrics[wire.PERSONAL_FOLDS] = folds
    else:
        judged = val
        model, chosen_epoch, aucs, metrics = _chosen_on_validation(
            spec.build(global_state).to(device), runtime, global_state, cfg, train, val, train_cfg,
            device, run_id, seed, schedule)
    how = f"{folds}-fold CV" if folds else "validation"
    log.info("site %s: personal model (%s) %s", site.name, fed.personalise,
             f"from epoch {chosen_epoch}" if chosen_epoch else f"= the global model (best on {how})")
    metrics.update({
        wire.NUM_EXAMPLES: len(runtime.train), wire.NUM_VAL: len(judged), "seconds": time.perf_counter() - start,
        wire.PERSONAL_EPOCH: chosen_epoch, "val_auc_global": aucs[0], "val_auc_personal": aucs[1],
    })
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    labels = [b.label for b in judged]
    return model, chosen_epoch, guard(metrics, wire.PERSONAL_METRIC_KEYS, min_patients, len(judged), labels,
                                      spec.n_classes)


def _chosen_by_cv(
    spec: ModelSpec, global_state: dict[str, torch.Tensor], cfg: ExperimentConfig, pool: list[Bag],
    train_cfg: TrainConfig, folds: int, device: torch.device,
) -> tuple[MILModel, int, tuple[float, float]]:
    """``personal_cv.cv_fine_tuning`` for finetune / proximal: (model, epoch, mean fold AUCs
    of the global and the chosen model)."""
    from micromil_core.federated.site_task import proximal_term

    fed = cfg.federation
    extra = (lambda m: proximal_term(m, global_state, fed.personal_mu)) if fed.personalise == "proximal" \
        else (lambda m: None)
    choice = cv_fine_tuning(lambda: spec.build(global_state), pool, train_cfg, fed.personal_epochs, folds,
                            device, last_round_span(cfg), extra, fed.personal_rule)
    model = choice.model if choice.model is not None else spec.build(global_state).to(device)
    return model, choice.epoch, (choice.auc_global, choice.auc_personal)


def _chosen_on_validation(
    model: MILModel, runtime: SiteRuntime, global_state: dict[str, torch.Tensor], cfg: ExperimentConfig,
    train: list[Bag], val: list[Bag], train_cfg: TrainConfig, device: torch.device, run_id: str,
    seed: int, schedule: tuple[int, int],
) -> tuple[MILModel, int, tuple[float, float], dict[str, Any]]:
    """The method's candidate against the global model on the validation patients: (model,
    epoch, their validation AUCs, the ledger's numbers under DP-SGD)."""
    global_score, global_val = score_on(train_cfg, model, train, val, device)
    chosen_epoch, personal_val, metrics = 0, global_val, {}
    if not val:  # nothing to choose with (and, under DP-SGD, no budget spent for nothing)
        log.warning("site %s has no validation patients: it keeps the global model", runtime.settings.name)
    else:
        candidate, epoch, metrics = _candidate(
            copy.deepcopy(model), runtime, global_state, cfg, train, val, train_cfg, device, run_id,
            seed, schedule,
        )
        personal_score, candidate_val = score_on(train_cfg, candidate, train, val, device)
        if personal_score > global_score:
            model, chosen_epoch, personal_val = candidate, epoch, candidate_val
    aucs = (global_val.get("auc", math.nan), personal_val.get("auc", math.nan))
    return model, chosen_epoch, aucs, metrics


def _candidate(
    candidate: MILModel, runtime: SiteRuntime, global_state: dict[str, torch.Tensor], cfg: ExperimentConfig,
    train: list[Bag], val: list[Bag], train_cfg: TrainConfig, device: torch.device, run_id: str,
    seed: int, schedule: tuple[int, int],
) -> tuple[MILModel, int, dict[str, Any]]:
    """The method's personal candidate, its epoch and (under DP-SGD) the ledger's numbers."""
    from micromil_core.federated.site_task import proximal_gradient, proximal_term
    from micromil_core.training.trainer import fit

    site, fed = runtime.settings, cfg.federation
    span = last_round_span(cfg)
    if fed.personalise == "local-head":
        check_local_head_privacy(site.privacy.enabled, fed.personalise)
        head = PersonalStore(site.state_dir, run_id, site.name).head_before(schedule[0])
        candidate.load_state_dict(with_head(candidate.state_dict(), head))
        result = train_local_head(candidate, train, val, train_cfg, fed.personal_epochs, device, span)
        return candidate, result.best_epoch, {}
    proximal = fed.personalise == "proximal"
    if not site.privacy.enabled:
        extra = proximal_term(candidate, global_state, fed.personal_mu) if proximal else None
        result = fit(candidate, train, val, train_cfg, device, extra_loss=extra,
                     epochs=fed.personal_epochs, progress_span=span)
        return candidate, result.best_epoch, {}
    # DP-SGD: one more round of the site's private training (the noise was calibrated for
    # it, see ``planned_rounds``), recorded in its ledger as round ``schedule[0]``.
    from micromil_core.privacy.site_round import private_train_round

    state, metrics = private_train_round(
        candidate, train, site.name, site.privacy, site.state_dir, run_id or "default",
        *schedule, fed.local_epochs, cfg.train.lr, cfg.train.weight_decay,
        cfg.train.batch_size, device, seed,
        proximal_gradient(global_state, fed.personal_mu) if proximal else None,
        optimizer=cfg.train.optimizer, momentum=cfg.train.momentum,
    )
    metrics.pop("train_loss", None)
    candidate.load_state_dict(state)
    return candidate.to(device), fed.local_epochs, metrics


def make_personal_model(
    runtime: SiteRuntime, settings: RoundSettings, global_state: dict[str, torch.Tensor],
    device: torch.device, run_id: str, min_patients: int, path: Path | None = None,
    schedule: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``personalise_site`` with the scaler the federation trained with (``settings``), then
    the personal model saved as a checkpoint at ``path`` (default: the site's state folder,
    ``PersonalStore.model_path``, where a second request from the same global model returns
    the first one's numbers); returns the metrics."""
    from micromil_core.federated.setup import federated_checkpoint
    from micromil_core.training.checkpoint import save_checkpoint

    cfg, spec, site = settings.experiment, settings.spec, runtime.settings
    if site.role != "train":
        raise SiteDataError(f"site {site.name} is a held-out site: it uses the global model")
    store = PersonalStore(site.state_dir, run_id, site.name) if path is None else None
    global_sha = state_sha256(global_state)
    fed = cfg.federation
    how = {"method": fed.personalise, "personal_epochs": fed.personal_epochs,
           "personal_mu": fed.personal_mu, "personal_folds": fed.personal_folds,
           "personal_rule": fed.personal_rule}
    if store is not None and (done := store.made_from(global_sha, how)) is not None:
        log.info("site %s: personal model already made from this global model: %s", site.name, store.model_path)
        return done
    scaler = runtime.scaler_for(settings.scaler, settings.site_scaler)
    model, epoch, metrics = personalise_site(runtime, spec, global_state, cfg, scaler, device, run_id,
                                             min_patients, schedule)
    # The checkpoint carries the global scaler, none under ``scaler: site``: the personal
    # model then standardises as the global one does at this site (evaluate fits the
    # statistics there), so the two are compared like for like.
    save_checkpoint(federated_checkpoint(
        cfg, spec, settings.classes, model.state_dict(), settings.scaler,
        {"federated": True, "personalised": cfg.federation.personalise, "site": site.name,
         "federation_id": run_id, "personal_epoch": epoch, "global_sha256": global_sha,
         "scaler": "site" if settings.site_scaler else "global"},
    ), path or store.model_path)
    if store is not None:
        store.record(global_sha, how, metrics)
    log.info("site %s: personal model saved to %s", site.name, path or store.model_path)
    return metrics


def personalise_checkpoint(
    checkpoint: str | Path, site: SiteSettings, out: str | Path, method: str = "finetune",
    overrides: Sequence[str] = (), device: str = "auto",
) -> dict[str, Any]:
    """A site's personal model from a global model.pt it was given (``flower-client
    personalise``), written to ``out``; returns the site's numbers (they stay here).

    The choice is made as a federation's last message makes it, with the same seed, except
    that nothing was kept from the rounds: ``local-head`` starts from the global model's
    head. Under DP-SGD the fine-tuning is a ledger run of its own (one round at the site's
    budget), composed with the others in the ledger's total."""
    from micromil_core.config import apply_overrides, build_config
    from micromil_core.federated.messages import RoundSettings
    from micromil_core.federated.site_task import ModelSpec, load_runtime
    from micromil_core.runtime import resolve_device
    from micromil_core.training.checkpoint import file_sha256, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = build_config(apply_overrides(dict(ckpt.config), [f"federation.personalise={method}", *overrides]))
    if cfg.federation.personalise == "none":
        raise ConfigError(f"--method none makes no personal model; choose one of {PERSONAL_METHODS}")
    spec = ModelSpec(ckpt.model_name, ckpt.in_dim, ckpt.n_classes, dict(ckpt.params))
    runtime = load_runtime(site, cfg.data, cfg.train, list(ckpt.classes))
    # As the federation ran: its global scaler, or (``scaler: site``, saved as none) the site's own.
    settings = RoundSettings(cfg, list(ckpt.classes), spec, ckpt.scaler, ckpt.provenance.get("scaler") == "site")
    run_id = f"personalise-{file_sha256(checkpoint)[:16]}"
    return make_personal_model(runtime, settings, ckpt.state_dict, resolve_device(device),
                               run_id, 1, Path(out), schedule=(cfg.federation.rounds + 1, 1))


_DP_HEAD = (
    "federation.personalise: local-head trains the head on the site's patients outside its "
    "DP-SGD accounting; with DP-SGD on, use finetune or proximal (recorded in the ledger)"
)


def check_local_head_privacy(privacy_enabled: bool, method: str, sites: Sequence[str] = ()) -> None:
    """A DP site refuses local-head: its head would see patients without DP-SGD."""
    if privacy_enabled and method == "local-head":
        raise ConfigError(_DP_HEAD + (f" (DP-SGD sites: {', '.join(sites)})" if sites else ""))
