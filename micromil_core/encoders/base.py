"""The encoder contract (specs to encoders: ``registry.py``).

An encoder maps a list of uint8 RGB images to a float32 feature matrix. Its ``cache_id``
names the feature cache folder, so it must change whenever the features would change.

Encoder specs (the ``encoder`` setting of a site/run config)::

    histo-texture              weight-free colour + texture descriptor (default, offline)
    pixels | pixels:<size>     grey image resized to size x size, flattened (default 28)
    torchscript:<path>         a TorchScript model file (or just an existing *.pt/.pth/.ts path)
    timm:<name>[@<checkpoint>] a timm model, weights from a local file (@file or weights=...)
    torchvision:<name>         a torchvision model, weights from a local file (weights=...)
    hf:<folder>                a Hugging Face transformers model saved in a local folder
    open_clip:<name>@<file>    an open_clip model's image tower, weights from a local file

Identity: an encoder with weights records the SHA-256 of each weight file
(``weight_hashes``); ``identity`` (name, weights digest, cache id) is what the feature
cache's manifest stores and what a federation compares between sites.
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

__all__ = ["DEFAULT_ENCODER", "Encoder", "combined_sha256", "identity_label"]

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
    # File name -> hex SHA-256 of every weight file; empty for weight-free encoders.
    weight_hashes: dict[str, str]

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.weight_hashes = {}

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

    @property
    def weights_sha256(self) -> str | None:
        """One digest of the weights: the file's SHA-256 for one file, for several the
        SHA-256 of their sorted ``name:sha256`` lines; None for a weight-free encoder."""
        return combined_sha256(getattr(self, "weight_hashes", None) or {})

    @property
    def identity(self) -> dict[str, Any]:
        """Who made a set of features: ``{"name", "weights_sha256", "files", "cache_id"}``.

        Two encoders with equal identities give the same features for the same image (up
        to float rounding between devices), whatever the paths they were loaded from.
        """
        return {"name": self.name, "weights_sha256": self.weights_sha256,
                "files": dict(sorted((getattr(self, "weight_hashes", None) or {}).items())),
                "cache_id": self.cache_id}

    @property
    def default_tile_size(self) -> int | None:
        """Tile side (pixels) a larger capture is cut into when extraction asks for the
        default tiling; None: the whole image is encoded (weight-free descriptors)."""
        return None

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


def combined_sha256(hashes: dict[str, str]) -> str | None:
    """One hex digest for ``{file name: sha256}``; see ``Encoder.weights_sha256``."""
    if not hashes:
        return None
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def identity_label(identity: dict[str, Any] | None) -> str:
    """One line naming an encoder identity in messages and on the wire:
    ``<cache id> sha256:<first 16 hex of the weights>`` (just the cache id without weights).
    The cache id is the feature cache's (crop and tile settings included) when the identity
    comes from a cache manifest.

    Equal labels mean equal features: the cache id hashes the encoder's name (never a local
    file or folder name), version, settings and the full weights digest; the visible prefix
    of the digest is for people.
    """
    if not identity:
        return "unknown encoder (precomputed features)"
    cache_id = identity.get("feature_cache_id") or identity["cache_id"]
    sha = identity.get("weights_sha256")
    return f"{cache_id} sha256:{sha[:16]}" if sha else str(cache_id)


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
