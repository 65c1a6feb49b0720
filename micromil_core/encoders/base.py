"""The encoder contract and the registry that turns a config string into an encoder.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromil_core.errors import ConfigError, unknown_name

__all__ = ["DEFAULT_ENCODER", "Encoder", "get_encoder", "list_encoders"]

DEFAULT_ENCODER = "histo-texture"

# Suffixes that make a bare path count as a TorchScript spec.
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")

_SPEC_FORMS: dict[str, str] = {
    "histo-texture": "weight-free H&E/IHC colour, stain and texture descriptor (default, offline)",
    "pixels[:<size>]": "grey image resized to size x size (default 28), flattened, in [0, 1]",
    "torchscript:<path>": "a TorchScript model file; a bare existing *.pt/.pth/.ts path also works",
    "timm:<name>": "a timm model with weights from a local file (needs `pip install timm`)",
    "torchvision:<name>": "a torchvision model with weights from a local file "
    "(needs `pip install torchvision`)",
}


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


def list_encoders() -> list[tuple[str, str]]:
    """Every encoder spec form with a one-line description: ``[(form, description), ...]``."""
    return list(_SPEC_FORMS.items())


def _parse_pixels(arg: str, spec: str) -> int:
    """Size of ``pixels[:<size>]``; 28 (Fashion-MNIST) when omitted."""
    if not arg:
        return 28
    try:
        size = int(arg)
    except ValueError:
        size = -1
    if not 2 <= size <= 1024:
        raise ConfigError(
            f"encoder {spec!r}: size must be an integer in [2, 1024], e.g. 'pixels:28'"
        )
    return size


def get_encoder(
    spec: str = DEFAULT_ENCODER,
    device: str | torch.device = "cpu",
    *,
    weights: str | Path | None = None,
    input_size: int | None = None,
) -> Encoder:
    """Build an encoder from its spec string (see the module docstring for the forms).

    Args:
        spec: encoder spec, e.g. ``histo-texture``, ``pixels:28``, ``torchscript:/m/enc.pt``.
        device: where torch models run (``cpu``, ``cuda``, ``cuda:1``).
        weights: local weight file for ``timm:`` / ``torchvision:`` models (required there:
            nothing is ever downloaded). Not accepted for other encoders.
        input_size: square network input size for model encoders (default 224, or the
            timm model's own pretrained config).

    Raises:
        UnknownNameError: ``spec`` matches no form; the message lists the forms.
        ConfigError: bad argument, missing file, missing optional package or weights.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"encoder spec {spec!r} is empty; use one of: {', '.join(_SPEC_FORMS)}")
    spec = spec.strip()
    dev = resolve_device(device)
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    model_kinds = ("torchscript", "timm", "torchvision")
    is_bare_script = (
        kind not in model_kinds
        and spec.lower().endswith(TORCHSCRIPT_SUFFIXES)
        and Path(spec).is_file()
    )
    if weights is not None and kind not in ("timm", "torchvision"):
        raise ConfigError(
            f"encoder {spec!r} takes no weights= file (got {weights}); weights are only for "
            "timm:<name> and torchvision:<name>"
        )
    if input_size is not None and kind not in model_kinds and not is_bare_script:
        raise ConfigError(f"encoder {spec!r} takes no input_size; it is for model encoders")

    # Imports are local: handcrafted/external import this module for the base class.
    if spec.lower() == "histo-texture":
        from micromil_core.encoders.handcrafted import HistoTextureEncoder

        encoder: Encoder = HistoTextureEncoder()
    elif kind == "pixels":
        from micromil_core.encoders.handcrafted import PixelsEncoder

        encoder = PixelsEncoder(_parse_pixels(arg, spec))
    elif kind == "torchscript" or is_bare_script:
        from micromil_core.encoders.external import TorchScriptEncoder

        path = arg if kind == "torchscript" else spec
        if not path:
            raise ConfigError("encoder 'torchscript:' needs a path, e.g. 'torchscript:enc.pt'")
        encoder = TorchScriptEncoder(path, device=dev, input_size=input_size or 224)
    elif kind in ("timm", "torchvision"):
        from micromil_core.encoders.external import TimmEncoder, TorchvisionEncoder

        if not arg:
            raise ConfigError(f"encoder {spec!r} needs a model name, e.g. '{kind}:resnet18'")
        cls = TimmEncoder if kind == "timm" else TorchvisionEncoder
        encoder = cls(arg, weights=weights, device=dev, input_size=input_size)
    elif spec.lower().endswith(TORCHSCRIPT_SUFFIXES):
        raise ConfigError(
            f"encoder {spec!r} looks like a TorchScript file but {Path(spec).resolve()} does "
            "not exist; check the path"
        )
    else:
        raise unknown_name("encoder", spec, list(_SPEC_FORMS))
    return encoder.to(dev)
