"""Batched extraction: tiles with coordinates, DataLoader workers, AMP, the encoder identity
in the feature cache, and the `micromil extract` options.

Sites are tiny folders in tmp_path holding the real 160 x 160 microscopy crops of
tests/data. Features are checked against the encoder run directly on the expected tiles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from micromil_core.data.features import read_feature_file
from micromil_core.data.layout import feature_cache_dir
from micromil_core.encoders import extract_site_features, get_encoder, read_image
from micromil_core.encoders.extract import MANIFEST_NAME, read_encoder_identity
from micromil_core.errors import ConfigError, ImageError

DATA = Path(__file__).resolve().parents[3] / "data"


def _site(root: Path, plan: dict[str, list[str]], csv: bool = False) -> Path:
    """images/<pid>/<k>.png copies of the named tests/data images (160 x 160)."""
    site = root / "site"
    for pid, names in plan.items():
        folder = site / "images" / pid
        folder.mkdir(parents=True)
        for k, name in enumerate(names):
            Image.open(DATA / f"{name}.png").save(folder / f"{k}.png")
    if csv:
        rows = "".join(f"{pid},{'a' if i % 2 else 'b'}\n" for i, pid in enumerate(plan))
        (site / "patients.csv").write_text("patient_id,label\n" + rows)
    return site


PLAN = {"p1": ["ihc", "he_tia"], "p2": ["he_stardist"]}


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture
def vit(tmp_path: Path) -> Path:
    transformers = pytest.importorskip(
        "transformers", reason="the hf: encoder needs the `encoders` extra (transformers)")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    folder = tmp_path / "tiny-vit"
    transformers.ViTModel(config).save_pretrained(folder)
    return folder


def test_histo_texture_without_tiling_is_unchanged(tmp_path: Path) -> None:
    site = _site(tmp_path, PLAN)
    encoder = get_encoder("histo-texture")
    result = extract_site_features(site, list(PLAN), encoder)
    assert result.feature_dir == feature_cache_dir(site, encoder.cache_id)  # no suffix
    assert result.tiles is None and (result.n_images, result.n_instances) == (3, 3)
    entry = _load(result.feature_dir / "p1.pt")
    assert set(entry) == {"features", "images", "encoder", "format"}  # no coords
    manifest = json.loads((result.feature_dir / MANIFEST_NAME).read_text())
    assert "tiles" not in manifest and "n_instances" not in manifest["patients"]["p1"]


@pytest.mark.parametrize(("overlap", "starts"), [(0, [0, 64]), (32, [0, 32, 64, 96])])
def test_tiles_are_instances_with_coords(tmp_path: Path, overlap: int, starts: list[int]) -> None:
    site = _site(tmp_path, PLAN)
    encoder = get_encoder("histo-texture")
    result = extract_site_features(site, list(PLAN), encoder, tile_size=64,
                                   tile_overlap=overlap, batch_size=5)
    per_image = len(starts) ** 2
    assert result.n_instances == 3 * per_image and result.tiles.size == 64
    assert result.feature_dir.name.endswith(f"-tile64{f'o{overlap}' if overlap else ''}")
    entry = _load(result.feature_dir / "p1.pt")
    expected_xy = [[x, y] for y in starts for x in starts]  # row by row
    assert entry["coords"].tolist() == expected_xy * 2
    assert entry["images"] == ["0.png"] * per_image + ["1.png"] * per_image
    # Row k is the encoder's features of exactly that tile of that image.
    image = read_image(site / "images" / "p1" / "1.png")
    tiles = [image[y:y + 64, x:x + 64] for x, y in expected_xy]
    torch.testing.assert_close(entry["features"][per_image:], encoder.encode(tiles))
    assert read_feature_file(result.feature_dir / "p1.pt").shape == (2 * per_image,
                                                                     encoder.dim)
    manifest = json.loads((result.feature_dir / MANIFEST_NAME).read_text())
    assert manifest["tiles"] == {"size": 64, "overlap": overlap}
    assert manifest["patients"]["p1"]["n_instances"] == 2 * per_image


def test_model_encoder_tiles_at_its_input_size_by_default(tmp_path: Path, vit: Path) -> None:
    site = _site(tmp_path, PLAN)
    small = read_image(DATA / "ihc.png")[:20, :24]  # smaller than one tile: encoded whole
    Image.fromarray(small).save(site / "images" / "p2" / "small.png")
    encoder = get_encoder(f"hf:{vit}")
    tiled = extract_site_features(site, list(PLAN), encoder, batch_size=16)
    assert tiled.tiles.size == encoder.input_size == 32
    entry = _load(tiled.feature_dir / "p2.pt")
    assert entry["features"].shape == (25 + 1, 32)  # 5 x 5 tiles + the small image whole
    assert entry["coords"][-1].tolist() == [0, 0]
    image = read_image(site / "images" / "p2" / "0.png")
    x, y = entry["coords"][7].tolist()
    assert (x, y) == (64, 32)
    torch.testing.assert_close(entry["features"][7], encoder.encode([image[32:64, 64:96]])[0],
                               rtol=1e-4, atol=1e-5)

    whole = extract_site_features(site, list(PLAN), encoder, tile_size=0)
    assert whole.tiles is None and whole.feature_dir != tiled.feature_dir
    assert _load(whole.feature_dir / "p2.pt")["features"].shape == (2, 32)
    assert "coords" not in _load(whole.feature_dir / "p2.pt")


def test_batch_size_and_workers_do_not_change_features(tmp_path: Path) -> None:
    site = _site(tmp_path, PLAN)
    encoder = get_encoder("histo-texture")
    one = extract_site_features(site, list(PLAN), encoder, tile_size=80, batch_size=3)
    reference = {p: _load(one.feature_dir / f"{p}.pt")["features"] for p in PLAN}
    for path in one.feature_dir.glob("*.pt"):
        path.unlink()
    (one.feature_dir / MANIFEST_NAME).unlink()
    again = extract_site_features(site, list(PLAN), encoder, tile_size=80, batch_size=64,
                                  workers=2)
    assert again.n_extracted == 2
    for pid in PLAN:
        assert torch.equal(_load(again.feature_dir / f"{pid}.pt")["features"], reference[pid])


def test_bad_image_in_a_worker_names_the_file_and_keeps_earlier_patients(
        tmp_path: Path) -> None:
    site = _site(tmp_path, {"p1": ["ihc"], "p2": ["he_tia", "he_stardist"]})
    bad = site / "images" / "p2" / "1.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    encoder = get_encoder("pixels:8")
    with pytest.raises(ImageError) as info:
        extract_site_features(site, ["p1", "p2"], encoder, workers=2, batch_size=64)
    message = str(info.value)
    assert str(bad) in message and "Traceback" not in message
    manifest = json.loads((feature_cache_dir(site, encoder.cache_id) / MANIFEST_NAME).read_text())
    assert set(manifest["patients"]) == {"p1"}  # encoded although its batch was not full


def test_amp_on_cpu_is_ignored(tmp_path: Path, vit: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = _site(tmp_path, {"p1": ["he_tia"]})
    encoder = get_encoder(f"hf:{vit}")
    plain = extract_site_features(site, ["p1"], encoder, tile_size=0)
    features = _load(plain.feature_dir / "p1.pt")["features"]
    (plain.feature_dir / "p1.pt").unlink()
    with caplog.at_level(logging.DEBUG, logger="micromil_core.encoders.extract"):
        amp = extract_site_features(site, ["p1"], encoder, tile_size=0, amp=True)
    assert amp.n_extracted == 1
    assert torch.equal(_load(amp.feature_dir / "p1.pt")["features"], features)
    assert "ignored on cpu" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_is_close_to_float32(tmp_path: Path, vit: Path) -> None:
    site = _site(tmp_path, PLAN)
    cpu = extract_site_features(site, list(PLAN), get_encoder(f"hf:{vit}"))
    reference = _load(cpu.feature_dir / "p1.pt")["features"]
    for path in cpu.feature_dir.glob("*"):
        path.unlink()
    gpu = extract_site_features(site, list(PLAN), get_encoder(f"hf:{vit}", device="cuda"),
                                amp=True, batch_size=256)
    assert gpu.feature_dir == cpu.feature_dir  # the device is not part of the cache id
    feats = _load(gpu.feature_dir / "p1.pt")["features"]
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, reference, rtol=0.05, atol=0.05)


def test_identity_reaches_the_cache_and_follows_the_weights(tmp_path: Path, vit: Path) -> None:
    site = _site(tmp_path, {"p1": ["ihc"]})
    encoder = get_encoder(f"hf:{vit}")
    first = extract_site_features(site, ["p1"], encoder, tile_size=0)
    identity = read_encoder_identity(first.feature_dir)
    assert identity["weights_sha256"] == encoder.weights_sha256
    assert identity["files"] == {"model.safetensors": encoder.weights_sha256}
    assert identity["name"] == "hf-vit"  # the architecture, not the folder's name
    assert first.feature_dir.name == f"features-{identity['feature_cache_id']}"

    weights = vit / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    second = extract_site_features(site, ["p1"], get_encoder(f"hf:{vit}"), tile_size=0)
    assert second.feature_dir != first.feature_dir and second.n_extracted == 1
    assert read_encoder_identity(second.feature_dir)["weights_sha256"] != identity[
        "weights_sha256"]
    assert read_encoder_identity(tmp_path / "nowhere") is None


def test_relabelled_scales_keep_tile_coords(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for scale, name in (("40X", "ihc"), ("100X", "he_tia")):
        (site / "images" / "p1" / scale).mkdir(parents=True)
        Image.open(DATA / f"{name}.png").save(site / "images" / "p1" / scale / "a.png")
    encoder = get_encoder("pixels:8")
    first = extract_site_features(site, ["p1"], encoder, tile_size=80)
    coords = _load(first.feature_dir / "p1.pt")["coords"]
    assert coords.shape == (8, 2)
    second = extract_site_features(site, ["p1"], encoder, tile_size=80,
                                   scale_names=["40X", "100X", "200X"])
    assert second.n_reused == 1  # relabelled, not re-encoded
    assert torch.equal(_load(second.feature_dir / "p1.pt")["coords"], coords)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tile_overlap": 8}, "without tiling"),
     ({"tile_size": 64, "tile_overlap": 64}, "less than the tile size"),
     ({"tile_size": 4}, "tile size must be an integer >= 8"),
     ({"workers": -1}, "workers must be an integer >= 0")],
)
def test_bad_tiling_or_workers(tmp_path: Path, kwargs: dict, match: str) -> None:
    site = _site(tmp_path, {"p1": ["ihc"]})
    with pytest.raises(ConfigError, match=match):
        extract_site_features(site, ["p1"], get_encoder("histo-texture"), **kwargs)


def test_cli_extract_options(tmp_path: Path, vit: Path, capsys: pytest.CaptureFixture) -> None:
    from micromil_core.cli import main

    site = _site(tmp_path, PLAN, csv=True)
    code = main(["extract", "--data", str(site), "--encoder", f"hf:{vit}", "--batch-size", "7",
                 "--amp", "--tile-size", "64", "--tile-overlap", "16", "--workers", "0",
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--amp ignored" in out and "encoder: hf-vit-v1-" in out
    assert "tiles of 64 px from 3 images" in out
    (cache,) = (site / "cache").glob("features-*-tile64o16")
    assert _load(cache / "p2.pt")["coords"].shape == (9, 2)  # starts 0, 48, 96 per axis

    assert main(["extract", "--data", str(site), "--tile-overlap", "8"]) == 2
    assert "without tiling" in capsys.readouterr().err
