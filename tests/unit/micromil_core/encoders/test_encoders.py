"""Image encoders: reading files, built-in descriptors, model encoders, the feature cache.

Real microscopy crops from tests/data (see its README) drive the encoder tests; sites are
tiny folders written into tmp_path. timm/torchvision are replaced by small fake modules,
so the wrapper logic is tested without the packages or any download.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from micromil_core.data.features import read_feature_file
from micromil_core.data.layout import feature_cache_dir
from micromil_core.encoders import (
    Encoder,
    extract_site_features,
    get_encoder,
    list_encoders,
    read_image,
)
from micromil_core.encoders import extract as extract_mod
from micromil_core.encoders.extract import MANIFEST_NAME
from micromil_core.encoders.handcrafted import HISTO_TEXTURE_DIM, HistoTextureEncoder
from micromil_core.errors import ConfigError, ImageError, SiteDataError, UnknownNameError

# torch 2.13 deprecates TorchScript; the encoder still supports it (see external.py).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

DATA = Path(__file__).resolve().parents[3] / "data"
TISSUES = ("ihc", "he_stardist", "he_tia")
BUILTIN_SPECS = ("histo-texture", "pixels", "pixels:16")


@pytest.fixture(scope="module")
def tissue() -> dict[str, np.ndarray]:
    """The three real 160 x 160 RGB crops, by name."""
    return {name: read_image(DATA / f"{name}.png") for name in TISSUES}


def _odd_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "constant": np.full((64, 64, 3), 200, np.uint8),
        "black": np.zeros((40, 50, 3), np.uint8),
        "fashion28": rng.integers(0, 256, (28, 28)).astype(np.uint8),  # 2-D grayscale
        "one_pixel": np.full((1, 1, 3), 17, np.uint8),
        "thin_strip": rng.integers(0, 256, (3, 300, 3)).astype(np.uint8),
    }


# --------------------------------------------------------------------------- read_image


def test_read_image_converts_modes_to_rgb_uint8(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "plain.bmp")
    Image.fromarray(grey).save(tmp_path / "grey.tif")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "photo.jpg")

    for name in ("grey.png", "rgba.png", "deep.png", "plain.bmp", "grey.tif", "photo.jpg"):
        img = read_image(tmp_path / name)
        assert img.dtype == np.uint8 and img.shape == (8, 8, 3), name
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png")[..., 1], grey)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.tif")[..., 2], grey)
    rgba_read = read_image(tmp_path / "rgba.png")
    assert (rgba_read[:4] == [255, 0, 0]).all()
    assert (rgba_read[4:] == 255).all()  # transparent -> white glass, not black tissue
    assert (read_image(tmp_path / "deep.png") == 255).all()  # 16-bit full scale -> 255


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty"])
def test_read_image_corrupt_file_names_file_and_fix(tmp_path: Path, damage: str) -> None:
    good = (DATA / "ihc.png").read_bytes()
    payload = {"truncated": good[: len(good) // 2], "not_an_image": b"hello " * 50,
               "empty": b""}[damage]
    bad = tmp_path / f"{damage}.png"
    bad.write_bytes(payload)
    with pytest.raises(ImageError) as info:
        read_image(bad)
    assert str(bad) in str(info.value)
    assert "re-export" in str(info.value) and "remove" in str(info.value)


def test_read_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        read_image(tmp_path / "nope.png")


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_builtin_encoders_dims_and_finite(spec: str, tissue: dict[str, np.ndarray]) -> None:
    encoder = get_encoder(spec)
    images = [*tissue.values(), *_odd_images().values()]
    feats = encoder.encode(images)
    assert feats.dtype == torch.float32
    assert feats.shape == (len(images), encoder.dim)
    assert torch.isfinite(feats).all()
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_builtin_dims() -> None:
    assert get_encoder().dim == HISTO_TEXTURE_DIM == len(HistoTextureEncoder.feature_names())
    assert 100 <= HISTO_TEXTURE_DIM <= 400
    assert get_encoder("pixels").dim == 28 * 28
    assert get_encoder("pixels:16").dim == 256


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_builtin_encoders_deterministic(spec: str, tissue: dict[str, np.ndarray]) -> None:
    images = list(tissue.values())
    first = get_encoder(spec).encode(images)
    again = get_encoder(spec).encode(images)  # a fresh instance: no hidden state
    one_by_one = torch.cat([get_encoder(spec).encode([img]) for img in images])
    assert torch.equal(first, again)
    assert torch.equal(first, one_by_one)


def test_histo_texture_separates_tissues_more_than_crops(tissue: dict[str, np.ndarray]) -> None:
    """Two overlapping crops of one image must be closer than crops of different tissues.

    A falsifiable check that the descriptor carries tissue information: the IHC image
    (brown DAB) and the two H&E images (one dense, one with stroma) differ in stain and
    texture; crops of one image share both.
    """
    encoder = get_encoder("histo-texture")
    crops = {(name, k): img[off:off + 128, off:off + 128]
             for name, img in tissue.items() for k, off in enumerate((0, 32))}
    feats = dict(zip(crops, encoder.encode(list(crops.values())), strict=True))
    for name in TISSUES:
        within = torch.dist(feats[(name, 0)], feats[(name, 1)])
        between = min(torch.dist(feats[(name, i)], feats[(other, j)])
                      for other in TISSUES if other != name for i in (0, 1) for j in (0, 1))
        assert within < 0.7 * between, (name, float(within), float(between))


def test_histo_texture_ignores_tile_orientation(tissue: dict[str, np.ndarray]) -> None:
    """Tissue has no canonical orientation: 90-degree turns and flips change nothing."""
    encoder = get_encoder("histo-texture")
    img = tissue["he_tia"]
    variants = [img, np.rot90(img), np.rot90(img, 2), np.fliplr(img), np.flipud(img)]
    feats = encoder.encode([np.ascontiguousarray(v) for v in variants])
    assert torch.allclose(feats, feats[:1].expand_as(feats), atol=1e-4)


def test_histo_texture_resizes_large_images(tissue: dict[str, np.ndarray]) -> None:
    """A 2x upscaled 1024-pixel image is described at 512 pixels, near the original."""
    img = Image.fromarray(tissue["he_stardist"]).resize((1024, 1024), Image.Resampling.BICUBIC)
    small = Image.fromarray(tissue["he_stardist"]).resize((512, 512), Image.Resampling.BICUBIC)
    encoder = get_encoder("histo-texture")
    big_f, small_f = encoder.encode([np.asarray(img), np.asarray(small)])
    assert torch.dist(big_f, small_f) < 0.2


def test_pixels_values() -> None:
    grey = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256
    feats = get_encoder("pixels").encode([grey.astype(np.uint8), np.full((50, 70, 3), 51,
                                                                           np.uint8)])
    np.testing.assert_allclose(feats[0].numpy(), grey.ravel() / 255.0, atol=1e-6)
    np.testing.assert_allclose(feats[1].numpy(), 0.2, atol=1e-5)


def test_cache_id_is_safe_and_tracks_output_settings() -> None:
    ids = {spec: get_encoder(spec).cache_id for spec in ("histo-texture", "pixels", "pixels:16")}
    assert len(set(ids.values())) == 3
    assert get_encoder("pixels:28").cache_id == ids["pixels"]
    for cid in ids.values():
        assert cid.replace("-", "").replace(".", "").isalnum() and len(cid) <= 64
    assert ids["histo-texture"].startswith("histo-texture-v")


# --------------------------------------------------------------------------- registry


def test_unknown_encoder_lists_the_forms() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_encoder("resnet-imaginary")
    message = str(info.value)
    assert "resnet-imaginary" in message
    for form, _ in list_encoders():
        assert form in message


def test_list_encoders_has_descriptions() -> None:
    forms = dict(list_encoders())
    assert {"histo-texture", "pixels[:<size>]", "torchscript:<path>", "timm:<name>",
            "torchvision:<name>"} <= set(forms)
    assert all(isinstance(v, str) and v and "\n" not in v for v in forms.values())


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("pixels:abc", {}, "size must be an integer"),
        ("pixels:0", {}, "size must be an integer"),
        ("histo-texture", {"weights": "w.pt"}, "takes no weights"),
        ("histo-texture", {"device": "gpu-please"}, "not a torch device"),
        ("", {}, "empty"),
        ("torchscript:", {}, "needs a path"),
        ("torchscript:/no/such/model.pt", {}, "file not found"),
        ("/no/such/model.pt", {}, "does not exist"),
        ("timm:", {}, "needs a model name"),
    ],
)
def test_get_encoder_bad_arguments(spec: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_encoder(spec, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        get_encoder("histo-texture", device="cuda")


@pytest.mark.parametrize(("kind", "package"), [("timm", "timm"), ("torchvision", "torchvision")])
def test_missing_optional_package(monkeypatch: pytest.MonkeyPatch, kind: str,
                                  package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ConfigError) as info:
        get_encoder(f"{kind}:resnet18", weights="w.pt")
    assert f"pip install {package}" in str(info.value)
    assert "locally" in str(info.value)


# --------------------------------------------------------------------------- model encoders


class _TinyNet(nn.Module):
    """Conv + global pool: (n, 3, S, S) -> (n, 8) for any S."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _save_script(path: Path, seed: int = 0) -> Path:
    torch.jit.script(_TinyNet(seed)).save(str(path))
    return path


def test_torchscript_encoder(tmp_path: Path, tissue: dict[str, np.ndarray]) -> None:
    model_path = _save_script(tmp_path / "tiny.pt")
    encoder = get_encoder(f"torchscript:{model_path}", input_size=64)
    assert encoder.dim == 8
    images = [*tissue.values(), *_odd_images().values()]  # mixed sizes and layouts
    feats = encoder.encode(images)
    assert feats.shape == (len(images), 8) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert torch.equal(feats, encoder.encode(images))  # eval mode, no randomness
    # A bare existing path is a TorchScript spec too, with the same cache id.
    assert get_encoder(str(model_path), input_size=64).cache_id == encoder.cache_id


def test_torchscript_cache_id_tracks_file_and_size(tmp_path: Path) -> None:
    path = _save_script(tmp_path / "enc.pt", seed=0)
    first = get_encoder(f"torchscript:{path}", input_size=32).cache_id
    assert get_encoder(f"torchscript:{path}", input_size=48).cache_id != first
    _save_script(path, seed=1)  # same name, new weights
    assert get_encoder(f"torchscript:{path}", input_size=32).cache_id != first


def test_torchscript_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    torch.save({"not": torch.zeros(2)}, bad)  # a pickle, not a TorchScript archive
    with pytest.raises(ConfigError) as info:
        get_encoder(f"torchscript:{bad}")
    assert str(bad) in str(info.value) and "torch.jit.script" in str(info.value)


class _FakeTimmNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.head = nn.Linear(6, 5)
        self.pretrained_cfg = {"input_size": (3, 40, 40), "mean": (0.5, 0.5, 0.5),
                               "std": (0.25, 0.25, 0.25)}

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_timm_wrapper_uses_local_weights_only(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path,
                                              tissue: dict[str, np.ndarray]) -> None:
    calls = []

    def create_model(name: str, pretrained: bool = False, **kwargs: object) -> nn.Module:
        calls.append((name, pretrained))
        return _FakeTimmNet()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    with pytest.raises(ConfigError, match="weights=<local file>"):
        get_encoder("timm:fake_net")

    source = _FakeTimmNet()
    weights = tmp_path / "fake.pth"
    torch.save({"state_dict": source.state_dict()}, weights)  # with head, wrapped
    encoder = get_encoder("timm:fake_net", weights=weights)
    assert calls[-1] == ("fake_net", False)  # never pretrained=True: no hub download
    assert encoder.dim == 6 and encoder.input_size == 40
    assert torch.equal(encoder.model.body.weight, source.body.weight)
    feats = encoder.encode(list(tissue.values()))
    assert feats.shape == (3, 6) and torch.isfinite(feats).all()

    torch.save({"something.else": torch.zeros(1)}, weights)
    with pytest.raises(ConfigError, match="does not match the architecture"):
        get_encoder("timm:fake_net", weights=weights)


def test_torchvision_wrapper_strips_head(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 4, kernel_size=3)
            self.fc = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x).mean(dim=(2, 3)))

    def get_model(name: str, weights: object = None) -> nn.Module:
        assert weights is None  # torchvision must not fetch weights itself
        return Net()

    fake = types.SimpleNamespace(models=types.SimpleNamespace(get_model=get_model))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    weights = tmp_path / "net.pth"
    torch.save({f"module.{k}": v for k, v in Net().state_dict().items()}, weights)  # DDP keys
    encoder = get_encoder("torchvision:net", weights=weights, input_size=32)
    assert encoder.dim == 4  # the pooled embedding, not the 10 logits
    assert encoder.encode([np.zeros((20, 20, 3), np.uint8)]).shape == (1, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torchscript_on_cuda_matches_cpu(tmp_path: Path, tissue: dict[str, np.ndarray]) -> None:
    path = _save_script(tmp_path / "tiny.pt")
    images = list(tissue.values())
    cpu = get_encoder(f"torchscript:{path}").encode(images)
    gpu_encoder = get_encoder(f"torchscript:{path}", device="cuda")
    assert next(gpu_encoder.model.parameters()).device.type == "cuda"
    torch.testing.assert_close(gpu_encoder.encode(images), cpu, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- feature cache


def _make_site(root: Path, tissue: dict[str, np.ndarray]) -> tuple[Path, list[str]]:
    """Three patients with 2-3 small crops each (one in a sub-folder, one JPEG)."""
    site = root / "site"
    plan = {"p1": ("ihc", 2), "p2": ("he_stardist", 3), "p3": ("he_tia", 2)}
    for pid, (name, n) in plan.items():
        folder = site / "images" / pid
        for k in range(n):
            crop = tissue[name][k * 30:k * 30 + 64, k * 30:k * 30 + 64]
            sub = folder / "region" if k == 1 else folder
            sub.mkdir(parents=True, exist_ok=True)
            suffix = ".jpg" if (pid, k) == ("p3", 1) else ".png"
            Image.fromarray(crop).save(sub / f"tile{k}{suffix}")
    return site, list(plan)


def _forbid_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: object) -> np.ndarray:
        raise AssertionError(f"image {path} was read although the cache is up to date")

    monkeypatch.setattr(extract_mod, "read_image", fail)


def test_extract_writes_cache_and_reuses_it(tmp_path: Path, tissue: dict[str, np.ndarray],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    site, pids = _make_site(tmp_path, tissue)
    encoder = get_encoder("histo-texture")
    result = extract_site_features(site, pids, encoder, batch_size=2, progress=True)
    assert (result.n_extracted, result.n_reused) == (3, 0)
    assert result.feature_dir == feature_cache_dir(site, encoder.cache_id)

    entry = torch.load(result.feature_dir / "p2.pt", weights_only=True)
    assert entry["images"] == ["region/tile1.png", "tile0.png", "tile2.png"]
    assert entry["features"].shape == (3, encoder.dim)
    assert entry["features"].dtype == torch.float32
    expected = encoder.encode([read_image(site / "images" / "p2" / p) for p in entry["images"]])
    assert torch.equal(entry["features"], expected)  # batching does not change features
    # The data layer reads the cache files as they are.
    assert read_feature_file(result.feature_dir / "p2.pt", encoder.dim).shape == (3, encoder.dim)

    manifest = json.loads((result.feature_dir / MANIFEST_NAME).read_text())
    assert manifest["encoder"] == encoder.cache_id and manifest["dim"] == encoder.dim
    assert set(manifest["patients"]) == set(pids)
    assert manifest["patients"]["p2"]["n_images"] == 3

    _forbid_reading(monkeypatch)
    again = extract_site_features(site, pids, get_encoder("histo-texture"))
    assert (again.n_extracted, again.n_reused) == (0, 3)


def test_extract_recomputes_changed_patients_only(tmp_path: Path,
                                                  tissue: dict[str, np.ndarray]) -> None:
    site, pids = _make_site(tmp_path, tissue)
    encoder = get_encoder("pixels:8")
    first = extract_site_features(site, pids, encoder)
    before = torch.load(first.feature_dir / "p1.pt", weights_only=True)["features"]

    changed = site / "images" / "p1" / "tile0.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse clocks
    Image.fromarray(tissue["he_tia"][:40, :40]).save(site / "images" / "p3" / "new.png")

    second = extract_site_features(site, pids, encoder)
    assert (second.n_extracted, second.n_reused) == (2, 1)
    entry = torch.load(second.feature_dir / "p1.pt", weights_only=True)
    after = entry["features"]
    row = entry["images"].index("tile0.png")
    assert not torch.equal(before, after) and torch.allclose(after[row], torch.ones(64))
    assert torch.load(second.feature_dir / "p3.pt", weights_only=True)["features"].shape[0] == 3

    # Another encoder gets its own folder and starts from scratch.
    other = extract_site_features(site, pids, get_encoder("pixels:4"))
    assert other.feature_dir != second.feature_dir and other.n_extracted == 3


def test_corrupt_image_keeps_existing_cache_valid(tmp_path: Path,
                                                  tissue: dict[str, np.ndarray]) -> None:
    site, pids = _make_site(tmp_path, tissue)
    encoder = get_encoder("histo-texture")
    done = extract_site_features(site, pids, encoder)
    manifest_path = done.feature_dir / MANIFEST_NAME
    manifest_before = manifest_path.read_bytes()
    p1_before = (done.feature_dir / "p1.pt").read_bytes()

    bad = site / "images" / "p2" / "tile2.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated mid-file
    with pytest.raises(ImageError) as info:
        extract_site_features(site, pids, encoder)
    assert str(bad) in str(info.value)
    assert manifest_path.read_bytes() == manifest_before
    assert (done.feature_dir / "p1.pt").read_bytes() == p1_before
    assert not list(done.feature_dir.glob("*.tmp"))  # no half-written files left behind


def test_failure_on_first_run_keeps_finished_patients(tmp_path: Path,
                                                      tissue: dict[str, np.ndarray],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    site, pids = _make_site(tmp_path, tissue)
    bad = site / "images" / "p3" / "tile0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    encoder = get_encoder("pixels")
    with pytest.raises(ImageError, match=r"tile0\.png"):
        extract_site_features(site, pids, encoder)
    cache = feature_cache_dir(site, encoder.cache_id)
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    assert set(manifest["patients"]) == {"p1", "p2"}
    assert read_feature_file(cache / "p1.pt", encoder.dim).shape == (2, encoder.dim)

    Image.fromarray(tissue["he_tia"][:64, :64]).save(bad)  # fixed by the user
    result = extract_site_features(site, pids, encoder)
    assert (result.n_extracted, result.n_reused) == (1, 2)


def test_patient_without_images_names_the_folder(tmp_path: Path,
                                                 tissue: dict[str, np.ndarray]) -> None:
    site, pids = _make_site(tmp_path, tissue)
    (site / "images" / "p4").mkdir()
    (site / "images" / "p4" / "notes.txt").write_text("no images here")
    with pytest.raises(ImageError) as info:
        extract_site_features(site, [*pids, "p4"], get_encoder("pixels"))
    assert "'p4'" in str(info.value) and str(site / "images" / "p4") in str(info.value)


def test_extract_rejects_unsafe_ids_and_batch_size(tmp_path: Path,
                                                   tissue: dict[str, np.ndarray]) -> None:
    site, _ = _make_site(tmp_path, tissue)
    with pytest.raises(SiteDataError, match="cannot be used as a file name"):
        extract_site_features(site, ["../p1"], get_encoder("pixels"))
    with pytest.raises(ConfigError, match="batch_size"):
        extract_site_features(site, ["p1"], get_encoder("pixels"), batch_size=0)


def test_unreadable_manifest_means_recompute(tmp_path: Path,
                                             tissue: dict[str, np.ndarray]) -> None:
    site, pids = _make_site(tmp_path, tissue)
    encoder = get_encoder("pixels")
    first = extract_site_features(site, pids, encoder)
    (first.feature_dir / MANIFEST_NAME).write_text("{ not json")
    again = extract_site_features(site, pids, encoder)
    assert (again.n_extracted, again.n_reused) == (3, 0)
    assert json.loads((first.feature_dir / MANIFEST_NAME).read_text())["patients"]


def test_encoder_contract_is_abstract() -> None:
    with pytest.raises(TypeError):
        Encoder()  # type: ignore[abstract]
