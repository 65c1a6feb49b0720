"""open_clip image towers with local weights: ``open_clip:<name>@<file>``.

The architecture is built by name with ``pretrained=None`` (nothing is downloaded; hub
names ``hf-hub:...`` are refused), then the local file (a state dict, ``.pt``/``.bin`` read
with ``weights_only=True``, or ``.safetensors``) is loaded into it. Features are
``model.encode_image(x)`` without the final L2 normalisation (MIL models standardise
features themselves). Preprocessing: the model's own ``visual.image_size``,
``visual.image_mean`` and ``visual.image_std`` when open_clip sets them, else 224 and the
OpenAI CLIP mean/std. open_clip is optional (``pip install open_clip_torch``; it imports
torchvision).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from micromil_core.encoders.base import _slug
from micromil_core.encoders.external import (
    ModelEncoder,
    _check_size,
    _load_state_dict,
    _need_weights,
    _refuse_hub_name,
    file_sha256,
)
from micromil_core.errors import ConfigError

__all__ = ["OpenClipEncoder"]

# OpenAI CLIP's normalisation (Radford et al. 2021), open_clip's default for its models.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _load_clip_weights(model: torch.nn.Module, weights: str | Path, source: str) -> None:
    """Load a whole-model or image-tower-only state dict; every image-tower weight must be
    in the file."""
    state = _load_state_dict(weights, source)
    target = model
    if state and not any(k.startswith("visual.") for k in state):
        target = model.visual  # a file of the image tower alone
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ConfigError(f"{source}: the weights file does not match the architecture "
                          f"({exc}); check the model name") from exc
    missing = [k for k in result.missing_keys if target is model.visual or k.startswith("visual.")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{source}: the weights file does not match the architecture (missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}); check the model name"
        )


def _side(size: object) -> int | None:
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, (tuple, list)) and size and isinstance(size[-1], int):
        return int(size[-1])
    return None


class OpenClipEncoder(ModelEncoder):
    """The image tower of an open_clip model (``open_clip:<name>@<file>``)."""

    version = 1

    def __init__(self, model_name: str, weights: str | Path | None = None,
                 device: str | torch.device = "cpu", input_size: int | None = None) -> None:
        super().__init__()
        self.source = f"encoder 'open_clip:{model_name}'"
        _refuse_hub_name(model_name, self.source)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # some text towers are HF models
        try:
            import open_clip  # optional dependency
        except ImportError as exc:
            raise ConfigError(
                f"{self.source} needs the open_clip_torch package: `pip install "
                "open_clip_torch` (it imports torchvision); weights must be available "
                f"locally (open_clip:<name>@<file>) ({type(exc).__name__}: {exc})"
            ) from exc
        _need_weights(self.source, weights, "open_clip")
        try:
            model = open_clip.create_model(model_name, pretrained=None)
        except Exception as exc:  # unknown names raise RuntimeError
            raise ConfigError(
                f"{self.source}: open_clip cannot build {model_name!r} ({exc})"
            ) from exc
        _load_clip_weights(model, weights, self.source)
        visual = model.visual
        self.mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
        self.input_size = _check_size(input_size or _side(getattr(visual, "image_size", None))
                                      or 224, self.source)
        self.model_name = model_name
        path = Path(weights).expanduser()
        self.weight_hashes = {path.name: file_sha256(path)}
        self.name = f"open-clip-{_slug(model_name, 30)}"
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.dim = self._probe_dim()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, D): the image embedding, not normalised."""
        feats = self.model.encode_image(x)
        return feats.reshape(feats.shape[0], -1)

    def params(self) -> dict[str, object]:
        return {"model": self.model_name, "weights_sha256": self.weights_sha256,
                "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}
