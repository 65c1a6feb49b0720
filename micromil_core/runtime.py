"""Seeds, devices and threads, set in one place."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from micromil_core.errors import ConfigError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device='cuda' but no CUDA GPU is visible to torch; "
            "use train.device=auto or cpu, or install a CUDA build of torch"
        )
    return torch.device(name)


def set_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)
