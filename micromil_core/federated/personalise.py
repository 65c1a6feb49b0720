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

Whatever the method, the candidates (each fine-tuning epoch) and the global model itself
are judged on the site's VALIDATION patients and the best one is kept, so a site whose
patients the global model already serves best keeps it (``personal_epoch`` 0). The test
split is never read here. The personal model is saved as a checkpoint in the site's own
folder and only aggregate numbers, withheld below the small-count guard, leave the site.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from micromil_core.config import ExperimentConfig, TrainConfig
from micromil_core.data.bag import Bag
from micromil_core.data.scaler import FeatureScaler
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.federated import wire
from micromil_core.io import torch_save_atomic
from micromil_core.models.base import MILModel
from micromil_core.privacy.disclosure import guard
from micromil_core.runtime import seed_everything

log = logging.getLogger(__name__)

# Methods whose fine-tuning is one more pass of local training after the last round: under
# DP-SGD the site's noise is calibrated for it (``planned_rounds``) and its ledger records it.
FINE_TUNING = ("finetune", "proximal")
MODEL_FILE = "model.pt"


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
    (the head of every round under ``local-head``, and the personal model)."""

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

    def save_head(self, server_round: int, head: dict[str, torch.Tensor]) -> None:
        """Keep round ``server_round``'s head (atomically) and the one before it: a resumed
        coordinator may replay the last round, which then starts from the head before it."""
        torch_save_atomic({k: v.detach().cpu() for k, v in head.items()}, self._head_path(server_round))
        for path in self.root.glob("head-round-*.pt"):
            if int(path.stem.rsplit("-", 1)[1]) < server_round - 1:
                path.unlink(missing_ok=True)

    def head_before(self, server_round: int) -> dict[str, torch.Tensor] | None:
        """The head saved by the latest round before ``server_round``, if any."""
        rounds = sorted(
            r for p in self.root.glob("head-round-*.pt")
            if (r := int(p.stem.rsplit("-", 1)[1])) < server_round
        )
        if not rounds:
            return None
        return torch.load(self._head_path(rounds[-1]), map_location="cpu", weights_only=True)


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


def train_local_head(
    model: MILModel, bags: list[Bag], val: list[Bag], cfg: TrainConfig, epochs: int,
    device: torch.device,
) -> Any:
    """Train the head alone on ``bags`` (selected on ``val`` when given); returns fit's result."""
    from micromil_core.training.trainer import fit

    with only_head_trains(model):
        return fit(model, bags, val, cfg, device, epochs=epochs, progress_span=(1.0, 1.0))


def local_head_round(
    spec: Any, trained: dict[str, torch.Tensor], bags: list[Bag], cfg: TrainConfig,
    store: PersonalStore, server_round: int, epochs: int, device: torch.device,
) -> None:
    """After round ``server_round``'s local training: the site's own head, from the one it
    kept last round, trained on the body it has just trained, and kept."""
    model = spec.build(trained).to(device)
    previous = store.head_before(server_round)
    if previous is not None:
        model.load_state_dict(with_head(model.state_dict(), previous))
    train_local_head(model, bags, [], cfg, epochs, device)
    state = model.state_dict()
    store.save_head(server_round, {k: state[k] for k in head_keys(model)})


def _score(cfg: TrainConfig, model: MILModel, val: list[Bag], device: torch.device) -> tuple[float, dict]:
    from micromil_core.training.trainer import evaluate_bags, selection_score

    metrics = evaluate_bags(model, val, device)
    return selection_score(cfg, metrics), metrics


def personalise_site(
    runtime: Any, spec: Any, global_state: dict[str, torch.Tensor], cfg: ExperimentConfig,
    scaler: FeatureScaler | None, device: torch.device, run_id: str, min_patients: int,
    schedule: tuple[int, int] | None = None,
) -> tuple[MILModel, int, dict[str, Any]]:
    """The site's personal model from the final global model, chosen on the site's
    validation patients only; returns (model, its fine-tuning epoch (0: the global model
    was best), reply metrics: aggregate, guarded). ``schedule``: (the round this step is,
    rounds its DP-SGD plans for); default the round after the federation's last."""
    from micromil_core.federated.site_task import round_seed

    site = runtime.settings
    start = time.perf_counter()
    scale = scaler.transform_all if scaler is not None else (lambda b: b)
    train, val = scale(runtime.train), scale(runtime.val)
    schedule = schedule or (cfg.federation.rounds + 1, planned_rounds(cfg))
    seed = round_seed(cfg.train.seed, schedule[0], site.name)
    seed_everything(seed)
    train_cfg = replace(cfg.train, seed=seed)
    model = spec.build(global_state).to(device)
    if not val:
        log.warning("site %s has no validation patients: it keeps the global model", site.name)
    global_score, global_val = _score(train_cfg, model, val, device) if val else (-math.inf, {})
    candidate, epoch, metrics = _candidate(
        copy.deepcopy(model), runtime, global_state, cfg, train, val, train_cfg, device, run_id, seed,
        schedule,
    )
    personal_score, personal_val = _score(train_cfg, candidate, val, device) if val else (-math.inf, {})
    chosen_epoch = epoch if personal_score > global_score else 0
    if chosen_epoch:
        model = candidate
    log.info("site %s: personal model (%s) %s", site.name, cfg.federation.personalise,
             f"from epoch {chosen_epoch}" if chosen_epoch else "= the global model (best on validation)")
    metrics.update({
        wire.NUM_EXAMPLES: len(runtime.train), "num_val": len(val), "seconds": time.perf_counter() - start,
        "personal_epoch": chosen_epoch,
        "val_auc_global": global_val.get("auc", math.nan),
        "val_auc_personal": (personal_val if chosen_epoch else global_val).get("auc", math.nan),
    })
    metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    labels = [b.label for b in val]
    return model, chosen_epoch, guard(metrics, wire.PERSONAL_METRIC_KEYS, min_patients, len(val), labels, spec.n_classes)


def _candidate(
    candidate: MILModel, runtime: Any, global_state: dict[str, torch.Tensor], cfg: ExperimentConfig,
    train: list[Bag], val: list[Bag], train_cfg: TrainConfig, device: torch.device, run_id: str,
    seed: int, schedule: tuple[int, int],
) -> tuple[MILModel, int, dict[str, Any]]:
    """The method's personal candidate, its epoch and (under DP-SGD) the ledger's numbers."""
    from micromil_core.federated.site_task import proximal_gradient, proximal_term
    from micromil_core.training.trainer import fit

    site, fed = runtime.settings, cfg.federation
    if fed.personalise == "local-head":
        check_local_head_privacy(site.privacy.enabled, fed.personalise)
        head = PersonalStore(site.state_dir, run_id, site.name).head_before(schedule[0])
        candidate.load_state_dict(with_head(candidate.state_dict(), head))
        return candidate, train_local_head(candidate, train, val, train_cfg, fed.personal_epochs, device).best_epoch, {}
    proximal = fed.personalise == "proximal"
    if not site.privacy.enabled:
        extra = proximal_term(candidate, global_state, fed.personal_mu) if proximal else None
        result = fit(candidate, train, val, train_cfg, device, extra_loss=extra,
                     epochs=fed.personal_epochs, progress_span=(1.0, 1.0))
        return candidate, result.best_epoch, {}
    # DP-SGD: one more round of the site's private training (the noise was calibrated for
    # it, see ``planned_rounds``), recorded in its ledger as round ``rounds + 1``.
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
    runtime: Any, settings: Any, global_state: dict[str, torch.Tensor], scaler: FeatureScaler | None,
    device: torch.device, run_id: str, min_patients: int, path: Path | None = None,
    schedule: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``personalise_site``, then the personal model saved as a checkpoint at ``path``
    (default: the site's state folder, ``PersonalStore.model_path``); returns the metrics."""
    from micromil_core.training.checkpoint import Checkpoint, save_checkpoint

    cfg, spec, site = settings.experiment, settings.spec, runtime.settings
    path = path or PersonalStore(site.state_dir, run_id, site.name).model_path
    model, epoch, metrics = personalise_site(runtime, spec, global_state, cfg, scaler, device, run_id,
                                             min_patients, schedule)
    save_checkpoint(
        Checkpoint(
            model_name=spec.name, in_dim=spec.in_dim, n_classes=spec.n_classes, params=spec.params,
            classes=list(settings.classes), state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            scaler=scaler, encoder=cfg.data.encoder, fine_classes=list(cfg.data.fine_classes) or None,
            config=cfg.to_dict(),
            provenance={"federated": True, "personalised": cfg.federation.personalise, "site": site.name,
                        "federation_id": run_id, "personal_epoch": epoch},
        ),
        path,
    )
    log.info("site %s: personal model saved to %s", site.name, path)
    return metrics


def personalise_checkpoint(
    checkpoint: str | Path, site: Any, out: str | Path, method: str = "finetune",
    overrides: Sequence[str] = (), device: str = "auto",
) -> dict[str, Any]:
    """A site's personal model from a global model.pt it was given (``flower-client
    personalise``): the same choice as a federation's last message, run at the site on
    its own; the model is written to ``out``. Returns the site's numbers (they stay here).

    Under DP-SGD the fine-tuning is a run of its own in the site's ledger (one round at the
    site's budget), composed with the others in the ledger's total."""
    from micromil_core.config import apply_overrides, build_config
    from micromil_core.federated.messages import RoundSettings
    from micromil_core.federated.site_task import ModelSpec, load_runtime
    from micromil_core.runtime import resolve_device
    from micromil_core.training.checkpoint import file_sha256, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = build_config(apply_overrides(dict(ckpt.config), [f"federation.personalise={method}", *overrides]))
    if cfg.federation.personalise == "none":
        raise ConfigError(f"--method none makes no personal model; choose one of {FINE_TUNING + ('local-head',)}")
    spec = ModelSpec(ckpt.model_name, ckpt.in_dim, ckpt.n_classes, dict(ckpt.params))
    runtime = load_runtime(site, cfg.data, cfg.train, list(ckpt.classes))
    site_scaler = ckpt.provenance.get("scaler") == "site"
    scaler = runtime.own_scaler if site_scaler and cfg.train.standardize else ckpt.scaler
    settings = RoundSettings(cfg, list(ckpt.classes), spec, scaler, site_scaler)
    run_id = f"personalise-{file_sha256(checkpoint)[:16]}"
    # As the federation's last message would (same seed), but its own DP-SGD run of one
    # round: the fine-tuning is all this run's noise is calibrated for.
    return make_personal_model(runtime, settings, ckpt.state_dict, scaler, resolve_device(device),
                               run_id, 1, Path(out), schedule=(cfg.federation.rounds + 1, 1))


def keep_local_head(
    runtime: Any, spec: Any, trained: dict[str, torch.Tensor], cfg: ExperimentConfig,
    scaler: FeatureScaler | None, server_round: int, device: torch.device, run_id: str,
) -> None:
    """Under ``local-head``: after the round's training, the site's own head (kept here)."""
    site = runtime.settings
    bags = scaler.transform_all(runtime.train) if scaler is not None else runtime.train
    store = PersonalStore(site.state_dir, run_id, site.name)
    local_head_round(spec, trained, bags, cfg.train, store, server_round, cfg.federation.local_epochs, device)


_DP_HEAD = (
    "federation.personalise: local-head trains the head on the site's patients outside its "
    "DP-SGD accounting; with DP-SGD on, use finetune or proximal (recorded in the ledger)"
)


def check_local_head_privacy(privacy_enabled: bool, method: str) -> None:
    """A DP site refuses local-head: its head would see patients without DP-SGD."""
    if privacy_enabled and method == "local-head":
        raise ConfigError(_DP_HEAD)
