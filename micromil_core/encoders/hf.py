"""Hugging Face ``transformers`` models from a local folder: ``hf:<folder>``.

The folder is what ``model.save_pretrained(folder)`` (plus, optionally, the image
processor's ``save_pretrained``) writes, e.g. a copy of ``owkin/phikon`` made once on a
machine with internet access::

    config.json                    architecture (required)
    model.safetensors              weights (required; or model.safetensors.index.json + shards)
    preprocessor_config.json       image_mean, image_std, size, crop_size (optional)

Loading is local only: ``local_files_only=True``, ``HF_HUB_OFFLINE=1`` for the process (set
only if the user has not set it), safetensors only (a pickled ``pytorch_model.bin`` can run
code when loaded) and no ``trust_remote_code`` (a folder's own Python is never executed).

Features (one vector per image), following the models' published usage:

* models whose embeddings carry a ``cls_token`` parameter (ViT, DINOv2, DeiT, BEiT: Phikon,
  Phikon-v2, ...) -> the CLS token, ``last_hidden_state[:, 0]``; this is how Phikon's and
  UNI's authors extract tile features;
* otherwise the model's ``pooler_output`` when it has one (Swin, ConvNeXt: their own
  pooling);
* otherwise the mean of ``last_hidden_state`` over tokens (or over the spatial grid).

Preprocessing comes from ``preprocessor_config.json`` when present (mean/std, resize of the
short side, centre crop), else ImageNet mean/std at the model's ``image_size`` (or 224).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from micromil_core.encoders.base import _slug
from micromil_core.encoders.external import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelEncoder,
    _check_size,
    file_sha256,
)
from micromil_core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["HFEncoder", "hf_weight_files", "read_preprocessing"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
EXPECTED = f"{CONFIG_FILE} and {WEIGHTS_FILE} (or {WEIGHTS_INDEX} with its shards)"
_HOW_TO = (
    "save it once on a machine with internet access with model.save_pretrained(folder, "
    "safe_serialization=True) (and the image processor's save_pretrained) and copy the "
    "folder to this site"
)


def hf_weight_files(folder: Path, source: str) -> list[Path]:
    """The safetensors weight files of a saved model folder, checked to exist.

    Raises:
        ConfigError: the folder, its config.json or its weights are missing; the message
            names exactly the files expected in which folder.
    """
    if not folder.is_dir():
        raise ConfigError(f"{source}: folder {folder} not found; expected {EXPECTED} in it: "
                          f"{_HOW_TO}")
    missing = [] if (folder / CONFIG_FILE).is_file() else [CONFIG_FILE]
    index = folder / WEIGHTS_INDEX
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{source}: cannot read {index} ({exc}); re-save the model") from exc
        files = [folder / name for name in shards]
        missing += [name for name in shards if not (folder / name).is_file()]
    else:
        files = []
        pickled = [p.name for p in folder.glob("pytorch_model*.bin")]
        missing.append(WEIGHTS_FILE + (
            f" (found {', '.join(sorted(pickled))}: pickled weights are not loaded because "
            "loading them can run code; convert them with model.save_pretrained(folder, "
            "safe_serialization=True))" if pickled else ""))
    if missing:
        raise ConfigError(f"{source}: expected {EXPECTED} in {folder}; missing: "
                          f"{', '.join(missing)}; {_HOW_TO}")
    return files


def _side(value: Any, what: str) -> int | None:
    """One side length from an image processor's ``size``/``crop_size`` entry."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if isinstance(value.get(key), int):
                if "height" in value and value.get("height") != value.get("width"):
                    log.warning("%s %s is not square; using height %s", what, value,
                                value["height"])
                return int(value[key])
    raise ConfigError(f"{what}: cannot read an image side from {value!r}")


def read_preprocessing(folder: Path, default_size: int, source: str) -> dict[str, Any]:
    """``{"mean", "std", "resize", "crop"}`` from the folder's preprocessor_config.json,
    or ImageNet mean/std with resize = crop = ``default_size`` when there is none."""
    out: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                           "resize": default_size, "crop": default_size}
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return out
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: cannot read {path} ({exc}); fix or remove it") from exc
    if cfg.get("do_normalize", True):
        out["mean"] = tuple(float(v) for v in cfg.get("image_mean", IMAGENET_MEAN))
        out["std"] = tuple(float(v) for v in cfg.get("image_std", IMAGENET_STD))
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resize = _side(cfg.get("size"), f"{path} size") if cfg.get("do_resize", True) else None
    crop = _side(cfg.get("crop_size"), f"{path} crop_size") if cfg.get(
        "do_center_crop", "crop_size" in cfg) else None
    out["resize"] = resize or crop or default_size
    out["crop"] = crop or out["resize"]
    return out


def _load_model(folder: Path, source: str) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            f"{source} needs the transformers and safetensors packages: `pip install "
            "transformers safetensors` (or micromil-fl[encoders])"
        ) from exc
    if hasattr(transformers.utils.logging, "disable_progress_bar"):
        transformers.utils.logging.disable_progress_bar()  # the CLI shows its own bar
    try:
        model = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False,
            use_safetensors=True,
        )
    except Exception as exc:  # config/weights mismatch, unknown model_type, custom code...
        raise ConfigError(
            f"{source}: transformers cannot load the model in {folder} ({type(exc).__name__}: "
            f"{exc}); models that need trust_remote_code are not loaded (their folder's code "
            "would run): export such a model to TorchScript and use torchscript:<file>"
        ) from exc
    # float32 whatever the saved dtype: CPU kernels for half precision are slow or missing;
    # extraction opts into mixed precision on CUDA with --amp.
    return model.float().eval()


class HFEncoder(ModelEncoder):
    """A ``transformers`` model saved in a local folder (``hf:<folder>``).

    Args:
        folder: the saved model folder (see the module docstring for its files).
        device: where the model runs.
        input_size: network input side; default: the preprocessor's crop size, else the
            model config's ``image_size``, else 224.
    """

    version = 1

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu",
                 input_size: int | None = None) -> None:
        super().__init__()
        self.folder = Path(folder).expanduser()
        self.source = f"encoder 'hf:{folder}'"
        files = hf_weight_files(self.folder, self.source)
        self.weight_hashes = {p.name: file_sha256(p) for p in files}
        self.config_sha256 = file_sha256(self.folder / CONFIG_FILE)
        self.device = torch.device(device)
        model = _load_model(self.folder, self.source)
        config = model.config
        native = getattr(config, "image_size", None)
        native = native if isinstance(native, int) else None
        prep = read_preprocessing(self.folder, native or 224, self.source)
        self.mean, self.std = tuple(prep["mean"]), tuple(prep["std"])
        self.input_size = _check_size(input_size or prep["crop"], self.source)
        self.resize_size = max(self.input_size, prep["resize"]) if not input_size else None
        self.model_type = str(getattr(config, "model_type", "unknown"))
        self.pooling = self._choose_pooling(model)
        forward_args = inspect.signature(model.forward).parameters
        # ViT's position embeddings have a fixed grid; another input size needs them
        # interpolated (transformers does it on request).
        self._interpolate = ("interpolate_pos_encoding" in forward_args
                             and native is not None and native != self.input_size)
        self.model = model.to(self.device)
        # The architecture, not the folder's name: the same weights copied to another
        # folder are the same encoder (the identity a federation compares between sites).
        self.name = f"hf-{_slug(self.model_type, 30)}"
        self.dim = self._probe_dim()

    @staticmethod
    def _choose_pooling(model: torch.nn.Module) -> str:
        """``cls``, or ``auto``: settled by the first forward pass to ``pooler`` when the
        output has a ``pooler_output``, else ``mean`` (see the module docstring)."""
        if any(name.endswith("cls_token") for name, _ in model.named_parameters()):
            return "cls"
        return "auto"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, D)"""
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=x, **kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        pooled = getattr(out, "pooler_output", None)
        if self.pooling == "auto":  # the probe in __init__ settles it, before cache_id is used
            self.pooling = "pooler" if pooled is not None else "mean"
        if self.pooling == "cls" and hidden is not None and hidden.dim() == 3:
            feats = hidden[:, 0]  # (n, H): the CLS token
        elif self.pooling != "mean" and pooled is not None:
            feats = pooled
        elif hidden is not None and hidden.dim() == 3:
            feats = hidden.mean(dim=1)  # (n, L, H) -> (n, H)
        elif hidden is not None and hidden.dim() == 4:
            feats = hidden.mean(dim=(2, 3))  # (n, C, h, w) -> (n, C)
        else:
            raise ConfigError(f"{self.source}: the model returns no last_hidden_state or "
                              "pooler_output; use a vision backbone (AutoModel)")
        return feats.reshape(feats.shape[0], -1)

    def params(self) -> dict[str, object]:
        return {"weights_sha256": self.weights_sha256, "config_sha256": self.config_sha256,
                "model_type": self.model_type, "pooling": self.pooling,
                "input_size": self.input_size, "resize": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}
