"""MRAN and the multi-scale data path: scales in feature files, scale folders of images,
crop scales, and the model's per-scale attention and losses (tiny seeded data)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micromil_core.cli import main
from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.features import (
    read_feature_file,
    read_features_and_scales,
    write_feature_file,
)
from micromil_core.data.layout import feature_cache_dir
from micromil_core.data.site import load_bags, load_site
from micromil_core.encoders import extract as extract_mod
from micromil_core.encoders import extract_site_features, get_encoder, read_image
from micromil_core.encoders.extract import (
    MANIFEST_NAME,
    center_crop,
    order_scale_names,
    parse_crop_scales,
)
from micromil_core.errors import ConfigError, FeatureError, ImageError
from micromil_core.models import build_model
from micromil_core.models.mran import MRAN
from tests.conftest import assert_per_bag_gradients_of_bags

DATA = Path(__file__).resolve().parents[3] / "data"
D, C = 6, 2
SMALL = {"embed_dims": "16,8", "attn_dim": 8, "dropout": 0.0}


# --- scales in feature files ------------------------------------------------------------


def _write_csv(site: Path, rows: dict[str, str]) -> None:
    site.mkdir(parents=True, exist_ok=True)
    with open(site / "patients.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "label"])
        writer.writerows(rows.items())


def test_scales_from_h5_pt_and_none_from_npy(tmp_path: Path) -> None:
    import h5py
    site = tmp_path / "site"
    (site / "features").mkdir(parents=True)
    feats = torch.randn(4, D)
    with h5py.File(site / "features" / "a.h5", "w") as fh:
        fh["features"] = feats.numpy()
        fh["scales"] = np.array([0, 1, 1, 3])
    torch.save({"features": feats, "scales": torch.tensor([2, 2, 0, 1])}, site / "features" / "b.pt")
    np.save(site / "features" / "c.npy", feats.numpy())
    write_feature_file(site / "features" / "d.pt", feats, scales=torch.tensor([0, 0, 1, 1]))
    _write_csv(site, {"a": "neg", "b": "pos", "c": "neg", "d": "pos"})

    bags = {b.patient_id: b for b in load_bags(load_site(site))}
    assert bags["a"].scales.tolist() == [0, 1, 1, 3] and bags["a"].scales.dtype == torch.long
    assert bags["b"].scales.tolist() == [2, 2, 0, 1]
    assert bags["c"].scales is None
    assert bags["d"].scales.tolist() == [0, 0, 1, 1]
    # Callers that only want features keep the old API.
    torch.testing.assert_close(read_feature_file(site / "features" / "a.h5"), feats)
    batch = collate_bags([bags["a"], bags["c"]])
    assert batch.scales.tolist() == [[0, 1, 1, 3], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    ("scales", "needle"),
    [
        (torch.tensor([0, 1, 1]), r"shape \(3,\).*4 rows"),
        (torch.tensor([0, -1, 1, 0]), "negative"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "not integers"),
    ],
)
def test_bad_scales_name_the_file_and_fix(tmp_path: Path, scales: torch.Tensor,
                                          needle: str) -> None:
    path = tmp_path / "p.pt"
    torch.save({"features": torch.randn(4, D), "scales": scales}, path)
    with pytest.raises(FeatureError, match=needle) as err:
        read_features_and_scales(path)
    assert str(path) in str(err.value) and "drop 'scales'" in str(err.value)


# --- scale folders of images and crop scales --------------------------------------------


@pytest.fixture(scope="module")
def tissue() -> dict[str, np.ndarray]:
    return {n: read_image(DATA / f"{n}.png") for n in ("ihc", "he_stardist", "he_tia")}


def _scale_site(root: Path, tissue: dict[str, np.ndarray]) -> Path:
    """Two patients imaged at 40X/100X/400X (p2 lacks 400X), as BreakHis stores captures."""
    site = root / "site"
    plan = {"p1": {"40X": 2, "100X": 1, "400X": 1}, "p2": {"100X": 2, "40X": 1}}
    for pid, folders in plan.items():
        for k, (folder, n) in enumerate(folders.items()):
            (site / "images" / pid / folder).mkdir(parents=True)
            for i in range(n):
                crop = tissue[("ihc", "he_tia", "he_stardist")[k]][i * 40:i * 40 + 64, :64]
                Image.fromarray(crop).save(site / "images" / pid / folder / f"c{i}.png")
    _write_csv(site, {"p1": "benign", "p2": "malignant"})
    return site


def test_order_of_scale_names() -> None:
    assert order_scale_names(["400X", "40X", "100X", "200X", "40X"]) == [
        "40X", "100X", "200X", "400X"
    ]
    assert order_scale_names(["low", "High", "mid"]) == ["High", "low", "mid"]


def test_image_scale_folders_become_scales(tmp_path: Path, tissue: dict[str, np.ndarray],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    site = _scale_site(tmp_path, tissue)
    encoder = get_encoder("histo-texture")
    result = extract_site_features(site, ["p1", "p2"], encoder)
    assert result.scale_names == ("40X", "100X", "400X")
    manifest = json.loads((result.feature_dir / MANIFEST_NAME).read_text())
    assert manifest["scales"] == ["40X", "100X", "400X"]
    entry = torch.load(result.feature_dir / "p2.pt", weights_only=True)
    assert entry["images"] == ["100X/c0.png", "100X/c1.png", "40X/c0.png"]
    assert entry["scales"].tolist() == [1, 1, 0]
    bags = load_bags(load_site(site), feature_dir=result.feature_dir)
    assert bags[0].scales.tolist() == [1, 2, 0, 0]  # 100X/c0, 400X/c0, 40X/c0, 40X/c1
    assert bags[0].features.shape == (4, encoder.dim)

    # The federation's list pins the indices (a site without 200X keeps 400X at 3) and the
    # cached rows are relabelled without reading a single image.
    monkeypatch.setattr(extract_mod, "read_image", lambda p: pytest.fail(f"read {p}"))
    pinned = extract_site_features(site, ["p1", "p2"], encoder,
                                   scale_names=["40X", "100X", "200X", "400X"])
    assert (pinned.n_extracted, pinned.n_reused) == (0, 2)
    assert load_bags(load_site(site), feature_dir=pinned.feature_dir)[0].scales.tolist() == [
        1, 3, 0, 0
    ]
    with pytest.raises(ImageError, match="400X"):
        extract_site_features(site, ["p1"], encoder, scale_names=["40X", "100X"])


def test_images_at_the_top_keep_a_single_scale(tmp_path: Path, tissue: dict[str, np.ndarray],
                                               caplog: pytest.LogCaptureFixture) -> None:
    site = _scale_site(tmp_path, tissue)
    Image.fromarray(tissue["ihc"][:32, :32]).save(site / "images" / "p2" / "loose.png")
    with caplog.at_level(logging.WARNING):
        result = extract_site_features(site, ["p1", "p2"], get_encoder("pixels:4"))
    assert result.scale_names == () and "single-scale" in caplog.text
    assert "scales" not in torch.load(result.feature_dir / "p2.pt", weights_only=True)
    assert all(b.scales is None for b in load_bags(load_site(site), feature_dir=result.feature_dir))


def test_crop_scales_double_the_instances_and_own_their_cache(
    tmp_path: Path, tissue: dict[str, np.ndarray]
) -> None:
    site = tmp_path / "site"
    for pid, name in (("p1", "ihc"), ("p2", "he_tia")):
        (site / "images" / pid).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(tissue[name][i * 50:i * 50 + 80, :80]).save(
                site / "images" / pid / f"t{i}.png"
            )
    _write_csv(site, {"p1": "benign", "p2": "malignant"})
    encoder = get_encoder("pixels:8")
    plain = extract_site_features(site, ["p1", "p2"], encoder)
    crops = extract_site_features(site, ["p1", "p2"], encoder, crop_scales="1.0,0.5")
    assert crops.feature_dir != plain.feature_dir  # crop settings never share a cache
    assert crops.n_extracted == 2 and crops.scale_names == ("crop1", "crop0.5")
    assert plain.feature_dir == feature_cache_dir(site, encoder.cache_id)  # unchanged id

    feats, scales = read_features_and_scales(crops.feature_dir / "p1.pt")
    base = read_feature_file(plain.feature_dir / "p1.pt")
    assert feats.shape == (4, encoder.dim) and scales.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(feats[scales == 0], base)  # crop 1.0 = the whole image
    image = read_image(site / "images" / "p1" / "t0.png")
    torch.testing.assert_close(feats[1], encoder.encode([center_crop(image, 0.5)])[0])
    other = extract_site_features(site, ["p1", "p2"], encoder, crop_scales=[1.0, 0.25])
    assert other.feature_dir not in (plain.feature_dir, crops.feature_dir)
    assert other.n_extracted == 2


def test_center_crop_zooms_into_the_middle() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 15:45] = 255  # the central half of each side
    zoomed = center_crop(image, 0.5)
    assert zoomed.shape == image.shape and zoomed.min() == 255
    assert center_crop(image, 1.0) is image


@pytest.mark.parametrize("value", ["", "1.0,1.0", "0", "1.5", "a,b"])
def test_bad_crop_scales(value: str) -> None:
    with pytest.raises(ConfigError, match="crop scales"):
        parse_crop_scales(value)


def test_cli_extract_with_crop_scales(tmp_path: Path, tissue: dict[str, np.ndarray],
                                      capsys: pytest.CaptureFixture) -> None:
    site = _scale_site(tmp_path, tissue)
    assert main(["extract", "--data", str(site), "--encoder", "pixels:4",
                 "--crop-scales", "1,0.5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "40X@1, 40X@0.5, 100X@1, 100X@0.5, 400X@1, 400X@0.5" in out
    assert main(["extract", "--data", str(site), "--crop-scales", "2"]) == 2


# --- the model ----------------------------------------------------------------------------


def _bags(seed: int = 0) -> list[Bag]:
    g = torch.Generator().manual_seed(seed)
    specs = [([0, 0, 1, 1, 1], 0), ([1, 1, 0], 1), ([1, 1, 1, 1], 0), ([0, 1, 0, 0, 1, 1], 1)]
    return [Bag(f"p{i}", torch.randn(len(s), D, generator=g), y, scales=torch.tensor(s))
            for i, (s, y) in enumerate(specs)]


def _mran(seed: int = 0, **params) -> MRAN:
    torch.manual_seed(seed)
    return build_model("mran", D, C, {**SMALL, "n_scales": 2, **params})


def test_single_scale_equals_all_scale_zero() -> None:
    model = _mran().eval()
    bags = [Bag(b.patient_id, b.features, b.label) for b in _bags()]  # no scales
    batch = collate_bags(bags)
    plain, batched = model.predict(batch.x, batch.mask), model.predict_batch(batch)
    torch.testing.assert_close(plain.probs, batched.probs)
    torch.testing.assert_close(plain.instance_scores, batched.instance_scores)
    assert torch.all(plain.extras["scale_attention"][:, 1] == 0)
    model.train()
    torch.testing.assert_close(model.loss(batch.x, batch.mask, batch.y)[0],
                               model.loss_batch(batch)[0])


def test_per_scale_losses_and_missing_scales() -> None:
    model = _mran().train()
    batch = collate_bags(_bags())
    loss, parts = model.loss_batch(batch)
    assert {"ce", "ce_scale0", "ce_scale1", "ce_instance", "aux_factor"} <= set(parts)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # the case attention too: bags mix scales
    pred = model.eval().predict_batch(batch)
    a = pred.extras["scale_attention"]  # (B, S)
    assert a[2, 0] == 0 and a[2, 1] == 1  # bag 2 has no scale-0 instance
    torch.testing.assert_close(a.sum(-1), torch.ones(4))
    torch.testing.assert_close(pred.instance_scores.sum(-1), torch.ones(4))
    assert torch.all(pred.extras["scale_probs"][2, 0] == 0)
    # Only scale 1 in the whole batch: scale 0 is skipped, not reported as a NaN.
    _, parts = model.loss_batch(collate_bags([_bags()[2]]))
    assert "ce_scale0" not in parts and np.isfinite(parts["ce_scale1"])


def test_eval_is_deterministic_and_padding_invariant() -> None:
    model = _mran(dropout=0.3).eval()
    bags = _bags()
    batch = collate_bags(bags)
    batch.x[~batch.mask] = 100.0  # padded rows hold garbage
    first, second = model.predict_batch(batch), model.predict_batch(batch)
    assert torch.equal(first.probs, second.probs)
    for i, bag in enumerate(bags):
        alone = model.predict_batch(collate_bags([bag]))
        torch.testing.assert_close(first.probs[i:i + 1], alone.probs, atol=1e-6, rtol=1e-5)


def test_scale_index_out_of_range_is_a_config_error() -> None:
    model = _mran()
    bags = _bags()
    bags[0].scales = torch.tensor([0, 0, 1, 2, 1])
    with pytest.raises(ConfigError, match=r"scale index 2.*n_scales=3"):
        model.predict_batch(collate_bags(bags))
    bags[0].scales = torch.tensor([0, -1, 1, 1, 1])
    with pytest.raises(ConfigError, match="scale index -1"):
        model.predict_batch(collate_bags(bags))


def test_threshold_drops_weak_instances() -> None:
    model = _mran(threshold=0.99, attention="logit").eval()
    pred = model.predict_batch(collate_bags(_bags()))
    # Only each scale's strongest instance survives a 0.99 threshold.
    assert int((pred.instance_scores > 0).sum()) == 7  # scales present: 2 + 2 + 1 + 2


def test_ramp_up() -> None:
    model = _mran(ramp_up=0.5)
    model.set_progress(0.0)
    assert model.aux_factor() == pytest.approx(np.exp(-5.0))
    model.set_progress(0.5)
    assert model.aux_factor() == 1.0
    model.set_progress(0.0)
    batch = collate_bags(_bags())
    loss, parts = model.train().loss_batch(batch)
    assert parts["aux_factor"] < 0.01 and loss.item() == pytest.approx(parts["ce"], rel=0.05)


def _scale_one_task(n_bags: int = 16, seed: int = 0) -> list[Bag]:
    """The label shows only in scale-1 instances; scale 0 is the same noise for both."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_bags):
        y = i % 2
        n0, n1 = 2 + i % 3, 2 + (i // 2) % 3
        x = torch.randn(n0 + n1, D, generator=g)
        x[n0:, :2] += 2.0 * y - 1.0  # scale 1: shifted by -1 (negative) or +1 (positive)
        order = torch.randperm(n0 + n1, generator=g)
        scales = torch.tensor([0] * n0 + [1] * n1)[order]
        bags.append(Bag(f"p{i}", x[order], y, scales=scales))
    return bags


def test_loss_decreases_when_the_label_shows_at_scale_one_only() -> None:
    model = _mran(seed=1)
    batch = collate_bags(_scale_one_task(seed=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(model.eval().loss_batch(batch)[0])

    before = eval_loss()
    for step in range(40):
        model.train().set_progress(step / 40)
        opt.zero_grad()
        model.loss_batch(batch)[0].backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
    pred = model.eval().predict_batch(batch)
    assert torch.equal(pred.probs.argmax(-1), batch.y)
    # The shared classifier reads the label off scale 1, and the case attention learned
    # to look there.
    scale_one = pred.extras["scale_probs"][:, 1].argmax(-1)  # (B,)
    assert float((scale_one == batch.y).float().mean()) >= 0.8
    assert float(pred.extras["scale_attention"][:, 1].mean()) > 0.6


def test_opacus_per_bag_gradients() -> None:
    assert_per_bag_gradients_of_bags(_mran, _bags())


def test_config_crop_scales_and_scale_names_reach_training_runs(
    tmp_path: Path, tissue: dict[str, np.ndarray]
) -> None:
    """data.crop_scales / data.scales are what `micromil train` and every site use."""
    from micromil_core.config import load_config
    from micromil_core.training.loading import load_sites

    site = _scale_site(tmp_path, tissue)
    cfg = load_config(None, ["data.encoder=pixels:4", "data.crop_scales=1.0,0.5",
                             "data.scales=40X,100X,200X,400X",
                             "data.classes=benign,malignant"])  # one patient of each
    (loaded,) = load_sites([site], cfg.data, torch.device("cpu"))
    p1 = next(b for b in loaded.bags if b.patient_id == "p1")
    assert p1.num_instances == 8  # 4 captures x 2 crops
    # index = folder index x crops + crop index; 400X is folder 3 of the pinned list
    assert sorted(set(p1.scales.tolist())) == [0, 1, 2, 3, 6, 7]
