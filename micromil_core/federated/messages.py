"""Round settings that travel in every message's ConfigRecord, as plain values.

The coordinator's experiment config (YAML text), the federation's class list and the
global feature scaler go to every site with each message, so a site needs nothing but
its own node config (name, data path, role) to take part.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from micromil_core.config import ExperimentConfig, build_config
from micromil_core.data.scaler import FeatureScaler
from micromil_core.federated.site_task import ModelSpec

EXPERIMENT = "experiment-yaml"
CLASSES = "classes"
MODEL_NAME = "model-name"
MODEL_IN_DIM = "model-in-dim"
MODEL_PARAMS = "model-params-yaml"
SCALER_MEAN = "scaler-mean"
SCALER_STD = "scaler-std"
SITE_SCALER = "site-scaler"  # 1: every site standardises with its own statistics


@dataclass
class RoundSettings:
    experiment: ExperimentConfig
    classes: list[str]
    spec: ModelSpec | None = None
    scaler: FeatureScaler | None = None
    site_scaler: bool = False

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            EXPERIMENT: self._experiment_yaml(),
            CLASSES: list(self.classes),
        }
        if self.spec is not None:
            out[MODEL_NAME] = self.spec.name
            out[MODEL_IN_DIM] = int(self.spec.in_dim)
            out[MODEL_PARAMS] = yaml.safe_dump(dict(self.spec.params), sort_keys=True)
        if self.scaler is not None:
            out[SCALER_MEAN] = [float(v) for v in self.scaler.mean]
            out[SCALER_STD] = [float(v) for v in self.scaler.std]
        if self.site_scaler:
            out[SITE_SCALER] = 1
        return out

    def _experiment_yaml(self) -> str:
        """The experiment as YAML, dumped once per experiment (the coordinator sends it
        in every message of every round)."""
        cached = self.__dict__.get("_dumped")
        if cached is None or cached[0] is not self.experiment:
            cached = (self.experiment, yaml.safe_dump(self.experiment.to_dict(), sort_keys=True))
            self.__dict__["_dumped"] = cached
        return cached[1]

    @classmethod
    def from_config(cls, config: Any) -> RoundSettings:
        experiment = _experiment_from_yaml(str(config[EXPERIMENT]))
        classes = [str(c) for c in config.get(CLASSES, [])]
        spec = None
        if MODEL_NAME in config:
            spec = ModelSpec(
                str(config[MODEL_NAME]),
                int(config[MODEL_IN_DIM]),
                len(classes),
                copy.deepcopy(_params_from_yaml(str(config[MODEL_PARAMS]))),
            )
        scaler = None
        if SCALER_MEAN in config:
            scaler = FeatureScaler(
                torch.tensor(list(config[SCALER_MEAN]), dtype=torch.float32),
                torch.tensor(list(config[SCALER_STD]), dtype=torch.float32),
            )
        return cls(experiment, classes, spec, scaler, bool(config.get(SITE_SCALER, 0)))


# Every message of a run carries the same experiment: parse each text once per process
# (parsing and checking it took ~5 ms of each site's message, a small site's train ~50 ms).
# ExperimentConfig is frozen; the params dict is copied for each message.
@functools.lru_cache(maxsize=8)
def _experiment_from_yaml(text: str) -> ExperimentConfig:
    return build_config(yaml.safe_load(text))


@functools.lru_cache(maxsize=8)
def _params_from_yaml(text: str) -> dict[str, Any]:
    return yaml.safe_load(text) or {}
