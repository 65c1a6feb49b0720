"""micromil_core: the science of micromil-fl (MIL models, site data, training).

This package never imports flwr: it is usable from a notebook, a unit test or any
federated runtime. The Flower apps in ``server/`` and ``client/`` are thin wrappers; a
whole federation on one machine is ``server.simulation.simulate``.

The entry points a notebook needs (docs/python-api.md has a worked example)::

    import micromil_core as mm
    cfg = mm.load_config("configs/sim-ucsb.yaml", ["train.epochs=5"])
    root = mm.prepare_dataset("ucsb-breast", "data/ucsb", sites=3, holdout_sites=1)
    print(mm.check_site(root.holdout_sites[0]).format())
    metrics = mm.train_pooled(root.train_sites, cfg, "runs/pooled")
    scores = mm.evaluate_checkpoint("runs/pooled/model.pt", root.holdout_sites, "runs/eval",
                                    explain=True)

They are imported on first use, so ``import micromil_core`` stays cheap.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# Set before anything imports torch (OpenMP reads it once, when torch loads): with OpenMP's
# default, idle threads spin waiting for work, and on a machine whose cores are busy with
# other processes small training steps ran up to 17x slower (benchmarks/threads_under_load.py).
# Every entry point (micromil, flower-server/-client, the Flower apps) imports this package
# first. A value the user set in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> module that defines it
_API = {
    "ExperimentConfig": "micromil_core.config",
    "load_config": "micromil_core.config",
    "prepare_dataset": "micromil_core.data.datasets",
    "read_sites_yaml": "micromil_core.data.data_root",
    "load_site": "micromil_core.data.site",
    "check_site": "micromil_core.data.site_check",
    "load_sites": "micromil_core.training.loading",
    "train_pooled": "micromil_core.training.fitting",
    "cross_validate": "micromil_core.training.cv",
    "evaluate_checkpoint": "micromil_core.training.score",
    "predict_checkpoint": "micromil_core.training.score",
    "calibrate_checkpoint": "micromil_core.training.score",
    "load_checkpoint": "micromil_core.training.checkpoint",
    "build_model": "micromil_core.models.registry",
    "read_history": "micromil_core.federated.history",
    "write_report": "micromil_core.report",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'micromil_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
