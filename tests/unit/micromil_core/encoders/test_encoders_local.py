"""Encoders from local weights (hf:, timm:NAME@FILE, open_clip:) and their identity.

Tiny models are built here and saved to tmp_path the way a hospital would save a
downloaded one (``save_pretrained``, a checkpoint file); the real microscopy crops of
tests/data go through them. Nothing may touch the network: loading runs with socket
connections forbidden. timm and open_clip cannot import here (they need torchvision, whose
PyPI wheels do not load beside the CPU torch build), so their wrappers are also driven by
small fake modules; the tests with the real packages skip with that reason.
"""

from __future__ import annotations

import json
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from micromil_core.encoders import get_encoder, list_encoders, read_image
from micromil_core.encoders.base import identity_label
from micromil_core.encoders.external import preprocess
from micromil_core.errors import ConfigError

transformers = pytest.importorskip(
    "transformers", reason="the hf: encoder needs the `encoders` extra (transformers)"
)

DATA = Path(__file__).resolve().parents[3] / "data"
TISSUES = ("ihc", "he_stardist", "he_tia")


@pytest.fixture(scope="module")
def tissue() -> list[np.ndarray]:
    """The three real 160 x 160 RGB microscopy crops."""
    return [read_image(DATA / f"{name}.png") for name in TISSUES]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def save_tiny_vit(folder: Path, *, seed: int = 0, preprocessor: dict | None = None) -> Path:
    """A random 1-layer ViT (hidden 32, 32 x 32 input, 8 x 8 patches) saved as a hospital
    would keep Phikon: config.json + model.safetensors (+ preprocessor_config.json)."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


VIT_PREPROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_normalize": True,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                    "do_resize": True, "size": {"height": 32, "width": 32}}


# --------------------------------------------------------------------------- hf:


def test_hf_vit_gives_the_cls_token_of_real_images(tmp_path: Path, tissue: list[np.ndarray],
                                                   offline: None) -> None:
    folder = save_tiny_vit(tmp_path / "phikon-tiny", preprocessor=VIT_PREPROCESSOR)
    encoder = get_encoder(f"hf:{folder}")
    assert (encoder.dim, encoder.input_size, encoder.pooling) == (32, 32, "cls")
    assert encoder.mean == (0.5, 0.5, 0.5) and encoder.std == (0.5, 0.5, 0.5)
    feats = encoder.encode(tissue)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    # Reference: the same saved model run directly; CLS = token 0 of the last layer.
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(pixel_values=preprocess(tissue, 32, (0.5,) * 3, (0.5,) * 3))
    torch.testing.assert_close(feats, hidden.last_hidden_state[:, 0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats, hidden.last_hidden_state[:, 1:].mean(1), atol=1e-3)
    # Three different tissues give three different features.
    assert torch.cdist(feats, feats).fill_diagonal_(1.0).min() > 1e-3


def test_hf_preprocessing_from_config_or_imagenet(tmp_path: Path) -> None:
    # DINOv2 style (Phikon-v2): short side to 40, centre crop 32.
    dino = save_tiny_vit(tmp_path / "dino", preprocessor={
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    enc = get_encoder(f"hf:{dino}")
    assert (enc.input_size, enc.resize_size) == (32, 40)
    assert enc.mean == (0.1, 0.2, 0.3) and enc.std == (0.4, 0.5, 0.6)
    # No preprocessor_config.json: ImageNet statistics at the model's image_size.
    plain = get_encoder(f"hf:{save_tiny_vit(tmp_path / 'plain')}")
    assert plain.input_size == 32
    assert plain.mean == pytest.approx((0.485, 0.456, 0.406))
    assert plain.cache_id != enc.cache_id


def test_hf_model_without_cls_token_uses_its_pooler(tmp_path: Path,
                                                    tissue: list[np.ndarray]) -> None:
    config = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16],
                                         depths=[1, 1])
    transformers.ConvNextModel(config).save_pretrained(tmp_path / "convnext")
    encoder = get_encoder(f"hf:{tmp_path / 'convnext'}")
    assert encoder.pooling == "pooler" and encoder.dim == 16
    assert encoder.input_size == 224  # no image_size in its config, no preprocessor file
    feats = encoder.encode(tissue[:2])
    assert feats.shape == (2, 16) and torch.isfinite(feats).all()


def test_hf_missing_folder_or_files_name_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        get_encoder(f"hf:{tmp_path / 'phikon'}")
    message = str(info.value)
    assert str(tmp_path / "phikon") in message
    assert "config.json and model.safetensors" in message and "not found" in message

    folder = save_tiny_vit(tmp_path / "partial")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"missing: model\.safetensors") as info:
        get_encoder(f"hf:{folder}")
    assert str(folder) in str(info.value)

    (folder / "pytorch_model.bin").write_bytes(b"pickle")  # present, but never loaded
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError) as info:
        get_encoder(f"hf:{folder}")
    assert "missing: config.json, model.safetensors" in str(info.value)
    assert "pytorch_model.bin" in str(info.value) and "safe_serialization" in str(info.value)

    with pytest.raises(ConfigError, match="needs a local folder"):
        get_encoder("hf:")


def test_identity_changes_when_one_weight_byte_changes(tmp_path: Path) -> None:
    folder = save_tiny_vit(tmp_path / "enc")
    before = get_encoder(f"hf:{folder}")
    same = get_encoder(f"hf:{folder}")
    assert same.identity == before.identity and same.cache_id == before.cache_id
    assert before.identity["files"] == {"model.safetensors": before.weights_sha256}
    assert len(before.weights_sha256) == 64

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data: the file stays loadable
    weights.write_bytes(bytes(data))
    after = get_encoder(f"hf:{folder}")
    assert after.weights_sha256 != before.weights_sha256
    assert after.cache_id != before.cache_id
    assert identity_label(after.identity) != identity_label(before.identity)
    assert after.weights_sha256[:16] in identity_label(after.identity)


def test_identity_does_not_depend_on_where_the_weights_lie(tmp_path: Path) -> None:
    """Two hospitals keep the same weights under their own folder names: one encoder."""
    import shutil

    folder = save_tiny_vit(tmp_path / "phikon", preprocessor=VIT_PREPROCESSOR)
    shutil.copytree(folder, tmp_path / "models-copy-of-phikon")
    here = get_encoder(f"hf:{folder}")
    there = get_encoder(f"hf:{tmp_path / 'models-copy-of-phikon'}")
    assert identity_label(here.identity) == identity_label(there.identity)
    assert here.name == "hf-vit"
    # A different model of the same architecture and size is another encoder.
    other = get_encoder(f"hf:{save_tiny_vit(tmp_path / 'other', seed=1, preprocessor=VIT_PREPROCESSOR)}")
    assert other.dim == here.dim and identity_label(other.identity) != identity_label(here.identity)


def test_hf_sharded_weights_all_count_in_the_identity(tmp_path: Path) -> None:
    folder = save_tiny_vit(tmp_path / "sharded")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.cls_token":
                                            "model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    from micromil_core.encoders.hf import hf_weight_files

    files = hf_weight_files(folder, "test")
    assert [f.name for f in files] == ["model-00001-of-00001.safetensors"]
    index["weight_map"]["pooler.dense.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="missing: model-00002-of-00002.safetensors"):
        hf_weight_files(folder, "test")


# --------------------------------------------------------------------------- timm / open_clip


class _FakeTimmVit(nn.Module):
    """Stands in for a timm ViT: LayerScale weights exist only with init_values."""

    def __init__(self, init_values: float | None = None) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 6, kernel_size=8, stride=8)
        if init_values is not None:
            self.gamma = nn.Parameter(torch.full((6,), init_values))
        self.head = nn.Linear(6, 3)
        self.pretrained_cfg = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406),
                               "std": (0.229, 0.224, 0.225)}

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).mean(dim=(2, 3))
        return self.head(h * self.gamma if hasattr(self, "gamma") else h)


def _fake_timm(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    def create_model(name: str, pretrained: bool = False, **kwargs: object) -> nn.Module:
        calls.append((name, pretrained, kwargs))
        return _FakeTimmVit(kwargs.get("init_values"))  # type: ignore[arg-type]

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))


def test_timm_name_at_checkpoint_with_folder_config(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path,
                                                    tissue: list[np.ndarray]) -> None:
    """The UNI layout: pytorch_model.bin + timm's config.json (model_args, pretrained_cfg)."""
    calls: list = []
    _fake_timm(monkeypatch, calls)
    uni = tmp_path / "uni"
    uni.mkdir()
    source = _FakeTimmVit(init_values=1e-5)
    torch.save(source.state_dict(), uni / "pytorch_model.bin")
    (uni / "config.json").write_text(json.dumps({
        "architecture": "vit_fake", "model_args": {"init_values": 1e-5},
        "pretrained_cfg": {"input_size": [3, 48, 48], "mean": [0.5, 0.5, 0.5],
                           "std": [0.5, 0.5, 0.5]}}))
    encoder = get_encoder(f"timm:vit_fake@{uni / 'pytorch_model.bin'}")
    assert calls[-1] == ("vit_fake", False, {"init_values": 1e-5})
    assert encoder.input_size == 48 and encoder.mean == (0.5, 0.5, 0.5)
    assert torch.equal(encoder.model.gamma, source.gamma)
    assert encoder.encode(tissue).shape == (3, 6)
    # The spec's @file and --weights are the same encoder.
    again = get_encoder("timm:vit_fake", weights=uni / "pytorch_model.bin")
    assert again.cache_id == encoder.cache_id
    with pytest.raises(ConfigError, match="keep one of them"):
        get_encoder(f"timm:vit_fake@{uni / 'pytorch_model.bin'}", weights=tmp_path / "x.pth")
    with pytest.raises(ConfigError, match="not 'vit_other'"):
        get_encoder(f"timm:vit_other@{uni / 'pytorch_model.bin'}")
    with pytest.raises(ConfigError, match=r"weights file .*missing\.bin not found"):
        get_encoder(f"timm:vit_fake@{tmp_path / 'missing.bin'}")


def test_timm_safetensors_checkpoint_and_hub_names(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from safetensors.torch import save_file

    calls: list = []
    _fake_timm(monkeypatch, calls)
    source = _FakeTimmVit()
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    encoder = get_encoder(f"timm:vit_fake@{tmp_path / 'model.safetensors'}")
    assert torch.equal(encoder.model.patch.weight, source.patch.weight)
    assert encoder.identity["files"] == {"model.safetensors": encoder.weights_sha256}
    with pytest.raises(ConfigError, match="hub names download"):
        get_encoder("timm:hf-hub:MahmoodLab/UNI", weights=tmp_path / "model.safetensors")


class _FakeClip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Conv2d(3, 5, kernel_size=4, stride=4)
        self.visual.image_size = 40
        self.visual.image_mean = (0.4, 0.4, 0.4)
        self.visual.image_std = (0.3, 0.3, 0.3)
        self.text = nn.Linear(4, 5)
        self.logit_scale = nn.Parameter(torch.ones(()))

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.visual(x).mean(dim=(2, 3))


def test_open_clip_image_tower_from_local_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               tissue: list[np.ndarray]) -> None:
    seen = []

    def create_model(name: str, pretrained: object = "x", **kwargs: object) -> nn.Module:
        seen.append((name, pretrained))
        return _FakeClip()

    monkeypatch.setitem(sys.modules, "open_clip",
                        types.SimpleNamespace(create_model=create_model))
    source = _FakeClip()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "conch.pt")
    encoder = get_encoder(f"open_clip:ViT-fake@{tmp_path / 'conch.pt'}")
    assert seen == [("ViT-fake", None)]  # never a pretrained tag: nothing downloads
    assert (encoder.dim, encoder.input_size, encoder.mean) == (5, 40, (0.4, 0.4, 0.4))
    torch.testing.assert_close(
        encoder.encode(tissue[:1]),
        source.encode_image(preprocess(tissue[:1], 40, (0.4,) * 3, (0.3,) * 3)))
    torch.save({"visual.weight": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="does not match the architecture"):
        get_encoder(f"open_clip:ViT-fake@{tmp_path / 'wrong.pt'}")


def test_missing_timm_or_open_clip_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for package, spec, hint in (("timm", "timm:vit_small@w.bin", "pip install timm"),
                                ("open_clip", "open_clip:ViT-B-16@w.bin",
                                 "pip install open_clip_torch")):
        monkeypatch.setitem(sys.modules, package, None)
        with pytest.raises(ConfigError) as info:
            get_encoder(spec)
        assert hint in str(info.value) and "torchvision" in str(info.value)


def _real_package(name: str) -> types.ModuleType | None:
    try:
        return __import__(name)
    except Exception:  # ImportError, or torchvision failing to register its operators
        return None


@pytest.mark.skipif(_real_package("timm") is None,
                    reason="timm is optional and not importable here: it imports torchvision, "
                    "whose PyPI wheels cannot load beside the CPU torch build")
def test_real_timm_checkpoint(tmp_path: Path, tissue: list[np.ndarray], offline: None) -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224",
        "model_args": {"img_size": 32, "patch_size": 8},
        "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    encoder = get_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'vit.pth'}")
    assert encoder.dim == 192 and encoder.input_size == 32
    assert encoder.encode(tissue).shape == (3, 192)


def test_micromil_encoders_lists_every_form(capsys: pytest.CaptureFixture) -> None:
    from micromil_core.cli import main

    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    for form in ("histo-texture", "torchscript:<path>", "hf:<folder>",
                 "timm:<name>@<checkpoint>", "open_clip:<name>@<checkpoint>"):
        assert form in out
    assert {f for f, _ in list_encoders()} <= {line.split()[0] for line in out.splitlines()}
