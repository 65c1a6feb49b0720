"""The encoder contract (specs to encoders: ``registry.py``).

An encoder maps a list of uint8 RGB images to a float32 feature matrix. Its ``cache_id``
names the feature cache folder, so it must change whenever the features would change.

Encoder specs (the ``encoder`` setting of a site/run config)::

    histo-texture              weight-free colour + texture descriptor (default, offline)
    pixels | pixels:<size>     grey image resized to size x size, flattened (default 28)
    torchscript:<path>         a TorchScript model file (or just an existing *.pt/.pth/.ts path)
    timm:<name>                a timm model, weights from a local file (weights=...)
    torchvision:<name>         a torchvision model, weights from a local file (weights=...)
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from micromil_core.errors import ConfigError

__all__ = ["DEFAULT_ENCODER", "Encoder"]

DEFAULT_ENCODER = "histo-texture"

def _slug(text: str, max_len: int = 40) -> str:
    """A filesystem-safe, lower-case fragment of ``text`` (letters, digits, ``.``, ``-``)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return slug[:max_len].rstrip("-.") or "encoder"


class Encoder(abc.ABC):
    """Images -> instance features.

    Subclasses set ``name`` and ``dim``, implement ``encode`` and list in ``params()`` every
    setting that changes the output (sizes, normalisation, file hashes). Bump ``version``
    when the code of an encoder changes its output, so old caches are not reused.

    Attributes:
        name: short human-readable name (``histo-texture``, ``pixels28``, ...).
        dim: feature dimension D.
        version: code version of the encoder's output.
        device: where torch computation runs (numpy encoders ignore it).
    """

    name: str
    dim: int
    version: int = 1

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def params(self) -> dict[str, Any]:
        """Settings that change the output; part of ``cache_id``. JSON-serialisable."""
        return {}

    @property
    def cache_id(self) -> str:
        """Short filesystem-safe id: ``<name>-v<version>-<hash of name, version, params>``.

        The device is deliberately left out: CPU and GPU features differ only by float
        rounding, and a site should not recompute its cache when it gains a GPU.
        """
        payload = json.dumps(
            {"name": self.name, "version": self.version, "params": self.params()},
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:10]
        return f"{_slug(self.name)}-v{self.version}-{digest}"

    @abc.abstractmethod
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Encode a batch of images.

        Args:
            images: n uint8 RGB arrays, each (H_i, W_i, 3); sizes may differ.

        Shapes:
            returns (n, dim) float32 on the CPU.
        """

    def to(self, device: str | torch.device) -> Encoder:
        """Run on ``device`` from now on; returns self."""
        self.device = torch.device(device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cache_id={self.cache_id!r}, dim={self.dim})"


def _empty_output(encoder: Encoder) -> torch.Tensor:
    return torch.zeros((0, encoder.dim), dtype=torch.float32)


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string and check it is usable here.

    Raises:
        ConfigError: unknown device string, or CUDA/MPS asked for but not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:<index>'"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} requested but MPS is not available; use 'cpu'")
    return dev
