"""The image path on real images: Fashion-MNIST bag task written as PNGs -> features
extracted with the offline histology encoder (cached) -> train -> evaluate --explain."""

import json

import pytest

from micromil_core.cli import main
from micromil_core.data.layout import CACHE_DIR

pytestmark = pytest.mark.slow


def test_fashion_bags_images_to_explanations(tmp_path, capsys):
    root = tmp_path / "fashion"
    assert main(["datasets", "prepare", "fashion-bags:standard/3", "--out", str(root),
                 "--max-bags", "80", "--seed", "0"]) == 0
    site = root / "site-0"
    assert any((site / "images").rglob("*.png"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(site), "--model", "micromil", "--encoder", "histo-texture",
                 "--epochs", "2", "--set", "model.params.n_clusters=4", "--set", "train.num_threads=1",
                 "--out", str(run)]) == 0
    caches = list((site / CACHE_DIR).iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("features-histo-texture")
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert len(manifest["patients"]) == sum(1 for _ in open(site / "patients.csv")) - 1

    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(site),
                 "--split", "test", "--explain", "--out", str(out)]) == 0
    # The checkpoint remembered the encoder: evaluation reused the cache, extracted nothing new.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] > 0
    pngs = list((out / "explain" / "site-0").glob("*.png"))
    assert len(pngs) == metrics["n"]
    # Galleries show the real images: a picture with thumbnails is far larger than a text grid.
    assert min(p.stat().st_size for p in pngs) > 5_000
