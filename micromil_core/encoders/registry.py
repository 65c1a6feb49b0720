"""Encoder specs to encoders: ``get_encoder("histo-texture")``, ``get_encoder("timm:NAME",
weights=FILE)`` and the forms ``micromil encoders`` lists.

Kept apart from ``base`` so the base class imports no concrete encoder, and each concrete
module imports only the base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from micromil_core.encoders.base import DEFAULT_ENCODER, Encoder, resolve_device
from micromil_core.encoders.external import TimmEncoder, TorchScriptEncoder, TorchvisionEncoder
from micromil_core.encoders.handcrafted import HistoTextureEncoder, PixelsEncoder
from micromil_core.errors import ConfigError, unknown_name

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

    if spec.lower() == "histo-texture":
        encoder: Encoder = HistoTextureEncoder()
    elif kind == "pixels":
        encoder = PixelsEncoder(_parse_pixels(arg, spec))
    elif kind == "torchscript" or is_bare_script:
        path = arg if kind == "torchscript" else spec
        if not path:
            raise ConfigError("encoder 'torchscript:' needs a path, e.g. 'torchscript:enc.pt'")
        encoder = TorchScriptEncoder(path, device=dev, input_size=input_size or 224)
    elif kind in ("timm", "torchvision"):
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
