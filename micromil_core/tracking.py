"""Experiment tracking: a run's config, per-epoch and per-round metrics and its output files,
sent to MLflow or written as TensorBoard event files. Off unless ``tracking.backend`` is set.

Only the coordinator (or the machine that runs ``micromil train``) tracks; a site in a
federation logs nothing remote. What is logged is what history.json and metrics.json
already hold: aggregates over patients, never a value per patient.

The libraries are imported only when a backend is chosen, so neither is a dependency of
the core install (``pip install "micromil-fl[tracking]"`` adds both).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from micromil_core.errors import ConfigError

if TYPE_CHECKING:
    from micromil_core.config import ExperimentConfig
    from micromil_core.federated.history import RoundRecord

log = logging.getLogger(__name__)

BACKENDS = ("none", "mlflow", "tensorboard")
INSTALL_HINT = 'pip install "micromil-fl[tracking]"'
# A run's files worth keeping beside its metrics, where the run wrote them.
OUTPUT_FILES = ("model.pt", "metrics.json", "history.json", "curves.png", "roc.png", "report.html")
MLFLOW_DB = "mlflow.db"
TENSORBOARD_DIR = "tensorboard"
# MLflow 3.x refuses parameter values longer than this (mlflow.utils.validation).
MAX_PARAM_LENGTH = 6000
# MLflow's log_batch takes at most 100 params and 1000 metrics per call.
PARAM_BATCH, METRIC_BATCH = 100, 1000


@dataclass(frozen=True)
class TrackingConfig:
    """The experiment's ``tracking:`` section (kept here, next to the trackers).

    backend: none | mlflow | tensorboard. uri: an MLflow tracking URI (``http://host:5000``,
    ``sqlite:///path.db``) or a TensorBoard log folder; "" = a store inside the run's --out
    folder (OUT/mlflow.db, OUT/tensorboard). experiment: the MLflow experiment name.
    """

    backend: str = "none"
    uri: str = ""
    experiment: str = "micromil"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"tracking.backend={self.backend!r} is invalid: expected one of {', '.join(BACKENDS)}"
            )
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment='' is invalid: expected a name, e.g. micromil")
        # The experiment config travels to every site and into model.pt: no secrets in it.
        if urlsplit(self.uri).password:
            raise ConfigError(
                "tracking.uri holds a password; it would be copied into model.pt and sent to "
                "the sites. Drop it from the URI and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) on the coordinator"
            )

    @property
    def enabled(self) -> bool:
        return self.backend != "none"


class Tracker:
    """The tracking contract, and the no-op used when tracking is off.

    A tracker is one run: ``log_config`` once, ``log_metrics`` per step (epoch or round),
    ``log_artifact`` per file, ``end`` once (``with`` ends it, failed on an exception).
    """

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The experiment config (``ExperimentConfig.to_dict()``) as the run's params."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Finite numbers at ``step``; anything else is left out."""

    def log_artifact(self, path: Path) -> None:
        """A file to keep with the run."""

    def end(self, failed: bool = False) -> None:
        """Close the run."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end(failed=exc_type is not None)


def open_tracker(cfg: ExperimentConfig, out: str | Path, kind: str) -> Tracker:
    """A started run for ``cfg.tracking`` (a no-op ``Tracker`` when it is off) with the
    config logged; named after the ``out`` folder, tagged with ``kind`` (train, federation).

    Raises:
        ConfigError: the backend's package is not installed, or the store cannot be opened.
    """
    settings, out = cfg.tracking, Path(out)
    if not settings.enabled:
        return Tracker()
    tracker = (MLflowTracker if settings.backend == "mlflow" else TensorBoardTracker)(
        settings, out, kind
    )
    tracker.log_config(cfg.to_dict())
    return tracker


def log_training(
    cfg: ExperimentConfig, out: str | Path, history: list[dict[str, Any]], metrics: Mapping[str, Any]
) -> None:
    """One finished ``train_pooled`` run: every epoch's history.json row at its epoch, the
    final metrics.json numbers after the last epoch, and the run's files."""
    if not cfg.tracking.enabled:
        return
    with open_tracker(cfg, out, "train") as tracker:
        for row in history:
            tracker.log_metrics(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
        last = int(history[-1]["epoch"]) if history else 0
        tracker.log_metrics(last, flatten_numbers(metrics))
        log_outputs(tracker, out)


def log_outputs(tracker: Tracker, out: str | Path) -> None:
    """The run's files (``OUTPUT_FILES``) that exist in ``out``."""
    for name in OUTPUT_FILES:
        if (Path(out) / name).is_file():
            tracker.log_artifact(Path(out) / name)


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The numbers of one federated round worth plotting: the patient-weighted aggregates
    (train, val = training sites' validation, holdout), each site's own aggregates (they
    left the site under its small-count guard), traffic, time and failures."""
    out: dict[str, float] = {}
    for phase, aggregated, per_site in (
        ("train", record.train_aggregated, record.train),
        ("val", record.evaluate_aggregated, record.evaluate),
        ("holdout", record.holdout_aggregated, record.holdout),
    ):
        out.update(flatten_numbers(aggregated, phase))
        for site, site_metrics in per_site.items():
            out.update(flatten_numbers(site_metrics, f"sites/{site}/{phase}"))
    out.update(flatten_numbers(record.central_dp or {}, "central_dp"))
    out.update(flatten_numbers({
        "wall_seconds": record.wall_seconds,
        "bytes_sent": record.bytes_sent,
        "bytes_received": record.bytes_received,
        "failures": len(record.failures),
        "rejected": sum(len(v) for v in record.rejected.values()),
        "stopped_for_privacy": len(record.stopped_for_privacy),
    }, "round"))
    return out


def flatten_numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"test": {"auc": 0.9}}`` -> ``{"test/auc": 0.9}``, keeping finite numbers only
    (no bools, lists such as ROC curves, NaN or None)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, name))
        elif _finite(value):
            out[name] = float(value)
    return out


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"name": "abmil"}}`` -> ``{"model.name": "abmil"}`` as MLflow params.

    The tracking section itself is left out: it says where the run went, not what it was.
    """
    out: dict[str, str] = {}
    for key, value in config.items():
        if not prefix and key == "tracking":
            continue
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:MAX_PARAM_LENGTH]
    return out


def default_mlflow_uri(out: str | Path) -> str:
    """A SQLite store in the run's folder. MLflow 3.x refuses its file store (./mlruns)
    unless MLFLOW_ALLOW_FILE_STORE is set, and names SQLite as the local default."""
    return f"sqlite:///{(Path(out).resolve() / MLFLOW_DB).as_posix()}"


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )


def check_installed(settings: TrackingConfig) -> None:
    """Refuse a backend whose package is missing before any training, not after it."""
    if settings.enabled:
        _require_package(settings.backend, settings.backend)


def _require_package(module: str, backend: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"tracking.backend={backend} needs the {module} package, which is not installed: "
            f"run {INSTALL_HINT}, or set tracking.backend: none"
        )


# MLflow allows letters, digits, _ - . / space and : in names; anything else becomes _.
_UNSAFE_KEY = re.compile(r"[^\w\-./ :]")


class MLflowTracker(Tracker):
    """One MLflow run through ``MlflowClient`` (no global active run, so two trackers in
    one process, e.g. ``compare``'s arms, never mix)."""

    def __init__(self, settings: TrackingConfig, out: Path, kind: str) -> None:
        _require_package("mlflow", "mlflow")
        # MLflow 3 sends usage telemetry unless told not to; a hospital's coordinator should
        # not phone home unasked. An explicit MLFLOW_DISABLE_TELEMETRY=false still wins.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = settings.uri or default_mlflow_uri(out)
        if not settings.uri:
            out.mkdir(parents=True, exist_ok=True)
        self._failed_once = False
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment_id = self._experiment_id(settings.experiment, uri)
            run = self.client.create_run(
                experiment_id, run_name=out.name, tags={"micromil.kind": kind}
            )
        except MlflowException as exc:
            raise ConfigError(
                f"tracking.uri={uri!r}: MLflow could not start a run ({exc.message}); check "
                "the URI and that the tracking server is up"
            ) from None
        self.run_id = run.info.run_id
        log.info("tracking to MLflow %s, experiment %r, run %s", uri, settings.experiment, self.run_id)

    def _experiment_id(self, name: str, uri: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            # With a SQLite store MLflow would put artefacts in ./mlruns under the working
            # folder; keep them beside the database instead, as `mlflow server` does.
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        if found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"tracking.experiment={name!r} was deleted in {uri}; restore it "
                "(mlflow experiments restore) or choose another name"
            )
        return found.experiment_id

    def _guarded(self, what: str, call: Any) -> None:
        # A tracking server that goes away must not end a federation hours in: warn once,
        # keep training; the run's own files in --out are complete either way.
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any failure of the remote store
            if not self._failed_once:
                log.warning("MLflow tracking failed (%s): %s; training goes on", what, exc)
            self._failed_once = True

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten_config(config).items()]
        for i in range(0, len(params), PARAM_BATCH):
            chunk = params[i : i + PARAM_BATCH]
            self._guarded("params", lambda c=chunk: self.client.log_batch(self.run_id, params=c))
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self._guarded("config", lambda: self.client.log_text(self.run_id, text, "config.json"))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(_UNSAFE_KEY.sub("_", k), float(v), now, int(step))
            for k, v in metrics.items() if _finite(v)
        ]
        for i in range(0, len(rows), METRIC_BATCH):
            chunk = rows[i : i + METRIC_BATCH]
            self._guarded("metrics", lambda c=chunk: self.client.log_batch(self.run_id, metrics=c))

    def log_artifact(self, path: Path) -> None:
        self._guarded(path.name, lambda: self.client.log_artifact(self.run_id, str(path)))

    def end(self, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self._guarded("end", lambda: self.client.set_terminated(self.run_id, status))


class TensorBoardTracker(Tracker):
    """Event files for ``tensorboard --logdir``: OUT/tensorboard, or a run folder under
    ``tracking.uri`` when several runs share one log folder. TensorBoard keeps no files, so
    artefacts stay where the run wrote them (beside the event files by default)."""

    def __init__(self, settings: TrackingConfig, out: Path, kind: str) -> None:
        _require_package("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        if settings.uri:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            self.log_dir = Path(settings.uri) / f"{out.name}-{stamp}"
        else:
            self.log_dir = out / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("kind", kind)
        log.info("tracking to TensorBoard event files in %s", self.log_dir)

    def log_config(self, config: Mapping[str, Any]) -> None:
        lines = [f"    {k}: {v}" for k, v in flatten_config(config).items()]  # markdown code
        self.writer.add_text("config", "\n".join(lines))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if _finite(value):
                self.writer.add_scalar(key, float(value), int(step))

    def log_artifact(self, path: Path) -> None:
        log.debug("TensorBoard keeps no artefacts; %s stays where it is", path)

    def end(self, failed: bool = False) -> None:
        if failed:
            self.writer.add_text("status", "FAILED")
        self.writer.close()

