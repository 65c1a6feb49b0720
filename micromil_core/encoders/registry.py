"""Encoder specs to encoders: ``get_encoder("histo-texture")``, ``get_encoder("hf:FOLDER")``,
``get_encoder("timm:NAME@FILE")`` and the forms ``micromil encoders`` lists.

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
    "hf:<folder>": "a Hugging Face transformers model in a local folder (config.json + "
    "model.safetensors; e.g. Phikon); needs micromil-fl[encoders]",
    "timm:<name>@<checkpoint>": "a timm model with weights from a local checkpoint (e.g. UNI; "
    "a config.json beside it gives model_args); needs `pip install timm`",
    "timm:<name>": "the same with the checkpoint given as --weights / data.encoder_weights",
    "torchvision:<name>": "a torchvision model with weights from a local file "
    "(needs `pip install torchvision`)",
    "open_clip:<name>@<checkpoint>": "an open_clip model's image tower (encode_image), weights "
    "from a local file (needs `pip install open_clip_torch`)",
}
# Kinds whose weights come from a file named in the spec (after '@') or by weights=.
_WEIGHT_KINDS = ("timm", "torchvision", "open_clip")
_MODEL_KINDS = ("torchscript", "hf", *_WEIGHT_KINDS)



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


def _split_checkpoint(kind: str, arg: str, weights: str | Path | None,
                      spec: str) -> tuple[str, str | Path | None]:
    """``NAME@CHECKPOINT`` -> (NAME, CHECKPOINT); a weights= file must not contradict it."""
    name, at, checkpoint = arg.partition("@")
    name = name.strip()
    if not name:
        raise ConfigError(f"encoder {spec!r} needs a model name, e.g. '{kind}:resnet18'")
    if not at:
        return name, weights
    if not checkpoint:
        raise ConfigError(f"encoder {spec!r}: nothing after '@'; give the local weights file, "
                          f"e.g. '{kind}:{name}@/models/{name}.pth'")
    if weights is not None and Path(weights).expanduser() != Path(checkpoint).expanduser():
        raise ConfigError(f"encoder {spec!r} names the weights {checkpoint} but weights= "
                          f"gives {weights}; keep one of them")
    return name, checkpoint


def _build(kind: str, arg: str, spec: str, dev: torch.device, weights: str | Path | None,
           input_size: int | None) -> Encoder:
    """The model encoder of one of ``_MODEL_KINDS``."""
    if kind == "torchscript":
        if not arg:
            raise ConfigError("encoder 'torchscript:' needs a path, e.g. 'torchscript:enc.pt'")
        return TorchScriptEncoder(arg, device=dev, input_size=input_size or 224)
    if kind == "hf":
        if not arg:
            raise ConfigError("encoder 'hf:' needs a local folder, e.g. 'hf:/models/phikon'")
        from micromil_core.encoders.hf import HFEncoder  # imports transformers lazily

        return HFEncoder(arg, device=dev, input_size=input_size)
    name, weights = _split_checkpoint(kind, arg, weights, spec)
    if kind == "open_clip":
        from micromil_core.encoders.clip import OpenClipEncoder

        return OpenClipEncoder(name, weights=weights, device=dev, input_size=input_size)
    cls = TimmEncoder if kind == "timm" else TorchvisionEncoder
    return cls(name, weights=weights, device=dev, input_size=input_size)


def get_encoder(
    spec: str = DEFAULT_ENCODER,
    device: str | torch.device = "cpu",
    *,
    weights: str | Path | None = None,
    input_size: int | None = None,
) -> Encoder:
    """Build an encoder from its spec string (see the module docstring for the forms).

    Args:
        spec: encoder spec, e.g. ``histo-texture``, ``pixels:28``, ``torchscript:/m/enc.pt``,
            ``hf:/models/phikon``, ``timm:vit_large_patch16_224@/models/uni/model.bin``.
        device: where torch models run (``cpu``, ``cuda``, ``cuda:1``).
        weights: local weight file for ``timm:`` / ``torchvision:`` / ``open_clip:`` models
            when the spec does not name one after ``@`` (required then: nothing is ever
            downloaded). Not accepted for other encoders.
        input_size: square network input size for model encoders (default 224, or the
            model's own preprocessing config).

    Raises:
        UnknownNameError: ``spec`` matches no form; the message lists the forms.
        ConfigError: bad argument, missing file or folder (the message names what is
            expected), missing optional package or weights.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"encoder spec {spec!r} is empty; use one of: {', '.join(_SPEC_FORMS)}")
    spec = spec.strip()
    dev = resolve_device(device)
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    is_bare_script = (
        kind not in _MODEL_KINDS
        and spec.lower().endswith(TORCHSCRIPT_SUFFIXES)
        and Path(spec).is_file()
    )
    if weights is not None and kind not in _WEIGHT_KINDS:
        raise ConfigError(
            f"encoder {spec!r} takes no weights= file (got {weights}); weights are only for "
            "timm:<name>, torchvision:<name> and open_clip:<name>"
        )
    if input_size is not None and kind not in _MODEL_KINDS and not is_bare_script:
        raise ConfigError(f"encoder {spec!r} takes no input_size; it is for model encoders")

    if spec.lower() == "histo-texture":
        encoder: Encoder = HistoTextureEncoder()
    elif kind == "pixels":
        encoder = PixelsEncoder(_parse_pixels(arg, spec))
    elif kind in _MODEL_KINDS or is_bare_script:
        if is_bare_script:
            kind, arg = "torchscript", spec
        encoder = _build(kind, arg, spec, dev, weights, input_size)
    elif spec.lower().endswith(TORCHSCRIPT_SUFFIXES):
        raise ConfigError(
            f"encoder {spec!r} looks like a TorchScript file but {Path(spec).resolve()} does "
            "not exist; check the path"
        )
    else:
        raise unknown_name("encoder", spec, list(_SPEC_FORMS))
    return encoder.to(dev)
