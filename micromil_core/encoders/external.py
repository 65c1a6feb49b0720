"""Neural encoders from files: TorchScript archives, timm and torchvision models
(Hugging Face folders: ``hf.py``; open_clip: ``clip.py``).

Nothing is ever downloaded: a TorchScript file carries its weights, and timm/torchvision
models are built without pretrained weights and then loaded from a local ``weights=`` file
(a state dict, optionally wrapped as {"state_dict": ...} or {"model": ...}, or a
``.safetensors`` file). timm and torchvision are optional packages, imported only when such
an encoder is asked for.

Preprocessing (all model encoders): resize so the short side equals ``input_size`` (or a
model's own ``resize_size``; bicubic, antialiased), centre-crop ``input_size`` x ``input_size``, scale to [0, 1],
normalise with ImageNet mean/std (or the timm model's own pretrained config). The
model's output is flattened per image: (n, ...) -> (n, dim).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from micromil_core.encoders.base import Encoder, _empty_output, _slug
from micromil_core.encoders.images import to_rgb_uint8
from micromil_core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ModelEncoder", "TimmEncoder", "TorchScriptEncoder", "TorchvisionEncoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Attribute names under which timm/torchvision keep the classification head.
_HEAD_NAMES = ("fc", "classifier", "heads", "head")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float],
               std: Sequence[float], resize: int | None = None) -> torch.Tensor:
    """Resize the short side to ``resize`` (default ``size``), centre-crop ``size``, normalise.

    Shapes:
        images: n arrays (H_i, W_i, 3) uint8 -> (n, 3, size, size) float32
    """
    short = max(size, resize or size)
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for k, image in enumerate(images):
        img = Image.fromarray(to_rgb_uint8(image))
        w, h = img.size
        scale = short / min(w, h)
        new_w, new_h = max(short, round(w * scale)), max(short, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out[k] = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(out).permute(0, 3, 1, 2)  # (n, 3, S, S)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def _check_size(size: Any, what: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise ConfigError(f"{what}: input_size must be an integer in [8, 4096], got {size!r}")
    return size


class ModelEncoder(Encoder):
    """Shared machinery of encoders that wrap a torch module.

    Subclasses set ``self.model`` (eval mode), ``self.input_size``, ``self.mean``,
    ``self.std`` and call ``_probe_dim()`` once the model is built.
    """

    model: nn.Module
    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int | None = None  # short side before the centre crop; None = input_size
    source: str = "model"

    @property
    def default_tile_size(self) -> int:
        """A capture larger than the network input is tiled at the input size."""
        return self.input_size

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model and flatten its output.  (n, 3, S, S) -> (n, D)"""
        out = self.model(x)
        if isinstance(out, (tuple, list)):  # e.g. (features, logits): the first is features
            out = out[0]
        if isinstance(out, dict):
            raise ConfigError(
                f"{self.source}: the model returns a dict ({sorted(out)}); export a model "
                "that returns a feature tensor"
            )
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
            raise ConfigError(
                f"{self.source}: expected a tensor with one row per image, got "
                f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
            )
        return out.reshape(out.shape[0], -1)

    def _probe_dim(self) -> int:
        """Output dimension from one blank image at the input size (on the CPU)."""
        x = torch.zeros(1, 3, self.input_size, self.input_size)
        try:
            with torch.inference_mode():
                return int(self._forward(x.to(self.device)).shape[1])
        except ConfigError:
            raise
        except Exception as exc:  # a user model can raise anything
            raise ConfigError(
                f"{self.source}: the model fails on a (1, 3, {self.input_size}, "
                f"{self.input_size}) input ({type(exc).__name__}: {exc}); set input_size to "
                "what the model expects"
            ) from exc

    def to(self, device: str | torch.device) -> ModelEncoder:
        super().to(device)
        self.model.to(self.device)
        return self

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Shapes: n images (H_i, W_i, 3) uint8 -> (n, dim) float32 on the CPU."""
        if len(images) == 0:
            return _empty_output(self)
        x = preprocess(images, self.input_size, self.mean, self.std,
                       self.resize_size).to(self.device)
        with torch.inference_mode():
            feats = self._forward(x)
        return feats.to("cpu", torch.float32)


class TorchScriptEncoder(ModelEncoder):
    """A TorchScript archive (``torch.jit.save``) mapping (n, 3, S, S) images to features.

    The cache id includes the file's SHA-256, so replacing the file invalidates caches.
    """

    version = 1

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 input_size: int = 224) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        self.source = f"TorchScript encoder {self.path}"
        if not self.path.is_file():
            raise ConfigError(f"{self.source}: file not found; check the path in the config")
        self.input_size = _check_size(input_size, self.source)
        self.device = torch.device(device)
        self.sha256 = file_sha256(self.path)
        self.weight_hashes = {self.path.name: self.sha256}
        try:
            model = torch.jit.load(str(self.path), map_location=self.device)
        except Exception as exc:  # jit.load raises RuntimeError and others
            raise ConfigError(
                f"{self.source}: not a loadable TorchScript archive ({type(exc).__name__}: "
                f"{exc}); export it with torch.jit.script(model).save(path) or "
                "torch.jit.trace(model, example).save(path)"
            ) from exc
        self.model = model.eval()
        # Not the file's name: the same weights under another name are the same encoder
        # (the identity a federation compares between sites).
        self.name = "torchscript"
        self.dim = self._probe_dim()

    def params(self) -> dict[str, object]:
        return {"sha256": self.sha256, "input_size": self.input_size,
                "mean": list(self.mean), "std": list(self.std)}


def _load_state_dict(weights: str | Path, source: str) -> dict[str, torch.Tensor]:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"{source}: weights file {path} not found; give a local file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file  # the `encoders` extra

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as exc:
        raise ConfigError(
            f"{source}: {path} is a safetensors file; `pip install safetensors` (or "
            "micromil-fl[encoders]) to read it"
        ) from exc
    except Exception as exc:  # pickle/zip/header errors of many kinds
        raise ConfigError(
            f"{source}: cannot load weights {path} ({type(exc).__name__}: {exc}); it must be "
            "a torch.save'd state dict or a .safetensors file"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{source}: {path} does not hold a state dict of tensors")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights into a head-less model; head weights in the file are ignored."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ConfigError(f"{source}: the weights file does not match the architecture "
                          f"({exc}); check the model name") from exc
    unexpected = [k for k in result.unexpected_keys if k.split(".")[0] not in _HEAD_NAMES]
    if result.missing_keys or unexpected:
        raise ConfigError(
            f"{source}: the weights file does not match the architecture (missing "
            f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}); check the model name"
        )


def _strip_head(model: nn.Module) -> None:
    """Replace the classification head with Identity so the model outputs its embedding."""
    if hasattr(model, "reset_classifier"):  # timm models
        model.reset_classifier(0)
        return
    for attr in _HEAD_NAMES:
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return
    log.warning("no classification head (%s) found; using the model's raw output",
                ", ".join(_HEAD_NAMES))


def _need_weights(source: str, weights: str | Path | None, package: str) -> None:
    if weights is None:
        raise ConfigError(
            f"{source}: give weights=<local file> (a state dict for this architecture). "
            f"Nothing is downloaded at run time: fetch the {package} weights once on a "
            "machine with internet access and copy the file to this site"
        )


class _LibraryEncoder(ModelEncoder):
    """Shared tail of the timm/torchvision wrappers: head removal, local weights, probe."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    model_args: Mapping[str, Any] = MappingProxyType({})  # extra constructor arguments

    def _finish(self, model, library: str, model_name: str, weights, device, input_size: int) -> None:
        _strip_head(model)
        _load_into(model, _load_state_dict(weights, self.source), self.source)
        self.input_size = _check_size(input_size, self.source)
        self.model_name = model_name
        self._weights_file_sha256 = file_sha256(Path(weights).expanduser())
        self.weight_hashes = {Path(weights).name: self._weights_file_sha256}
        self.name = f"{library}-{_slug(model_name, 30)}"
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.dim = self._probe_dim()

    def params(self) -> dict[str, object]:
        out = {"model": self.model_name, "weights_sha256": self._weights_file_sha256,
               "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}
        if self.model_args:  # only then: caches of encoders without them keep their id
            out["model_args"] = dict(self.model_args)
        return out


def _refuse_hub_name(model_name: str, source: str) -> None:
    """timm/open_clip resolve ``hf-hub:org/repo`` names by downloading: never here."""
    if model_name.lower().startswith(("hf-hub:", "hf_hub:")):
        raise ConfigError(
            f"{source}: hub names download at run time; give the architecture name and the "
            "local weights instead, e.g. 'timm:vit_large_patch16_224@/models/uni/"
            "pytorch_model.bin' (a config.json beside the file supplies its model_args)"
        )


def timm_folder_config(weights: str | Path, model_name: str, source: str) -> dict[str, Any]:
    """The ``config.json`` timm writes beside hub weights (``architecture``, ``model_args``,
    ``pretrained_cfg``), read from the weights file's folder; {} when there is none.

    Pathology models such as UNI need their ``model_args`` (e.g. ``init_values``) to build
    the architecture the weights were trained with.
    """
    path = Path(weights).expanduser().parent / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: cannot read {path} ({exc}); fix or remove it") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: {path} is not a JSON object; fix or remove it")
    arch = cfg.get("architecture")
    if arch and arch != model_name:
        raise ConfigError(
            f"{source}: {path} describes architecture {arch!r}, not {model_name!r}; use "
            f"'timm:{arch}@{weights}' or move the config.json away"
        )
    return cfg


class TimmEncoder(_LibraryEncoder):
    """A timm architecture (``timm:<name>@<checkpoint>``) with weights from a local file.

    Preprocessing uses the pretrained config (input size, mean, std) of the ``config.json``
    beside the checkpoint when there is one, else timm's own for the name, else ImageNet
    defaults at 224. That file's ``model_args`` are passed to ``timm.create_model``.
    """

    version = 1

    def __init__(self, model_name: str, weights: str | Path | None = None,
                 device: str | torch.device = "cpu", input_size: int | None = None) -> None:
        super().__init__()
        self.source = f"encoder 'timm:{model_name}'"
        _refuse_hub_name(model_name, self.source)
        try:
            import timm  # optional dependency
        except ImportError as exc:
            raise ConfigError(
                f"{self.source} needs the timm package: `pip install timm` (it imports "
                "torchvision too); weights must be available locally (timm:<name>@<file> or "
                f"weights=<file>), nothing is downloaded ({type(exc).__name__}: {exc})"
            ) from exc
        _need_weights(self.source, weights, "timm")
        folder_cfg = timm_folder_config(weights, model_name, self.source)
        self.model_args = dict(folder_cfg.get("model_args") or {})
        try:
            # pretrained=False: timm must never reach for the Hugging Face hub.
            model = timm.create_model(model_name, pretrained=False, **self.model_args)
        except Exception as exc:  # unknown names raise RuntimeError
            raise ConfigError(f"{self.source}: timm cannot build {model_name!r} ({exc})") from exc
        cfg = folder_cfg.get("pretrained_cfg") or getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        default_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        self._finish(model, "timm", model_name, weights, device, input_size or default_size)


class TorchvisionEncoder(_LibraryEncoder):
    """A torchvision architecture (``torchvision:<name>``) with weights from a local file."""

    version = 1

    def __init__(self, model_name: str, weights: str | Path | None = None,
                 device: str | torch.device = "cpu", input_size: int | None = None) -> None:
        super().__init__()
        self.source = f"encoder 'torchvision:{model_name}'"
        try:
            import torchvision  # optional dependency
        except ImportError as exc:
            raise ConfigError(
                f"{self.source} needs the torchvision package: `pip install torchvision`; "
                "weights must be available locally (weights=<file>), nothing is downloaded"
            ) from exc
        _need_weights(self.source, weights, "torchvision")
        try:
            # weights=None: torchvision must not download; the local file is loaded below.
            model = torchvision.models.get_model(model_name, weights=None)
        except Exception as exc:  # unknown names raise ValueError
            raise ConfigError(
                f"{self.source}: torchvision cannot build {model_name!r} ({exc})"
            ) from exc
        self._finish(model, "torchvision", model_name, weights, device, input_size or 224)
