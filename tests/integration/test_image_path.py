"""The image path on real images: Fashion-MNIST bag task written as PNGs -> features
extracted with the offline histology encoder (cached) -> train -> evaluate --explain."""

import json
import re

import pytest

from micromil_core.cli import main
from micromil_core.data.layout import CACHE_DIR
from micromil_core.encoders.base import identity_label
from micromil_core.training.checkpoint import load_checkpoint
from tests.browser import is_blank, probe, screenshot

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
    # The checkpoint names the encoder behind its features as the cache does (issue 23).
    identity = load_checkpoint(run / "model.pt").provenance["encoder_identity"]
    assert identity == identity_label(manifest["encoder_identity"])
    assert identity.startswith("histo-texture")

    def cache_state() -> dict[str, int]:
        return {str(f): f.stat().st_mtime_ns for f in caches[0].rglob("*") if f.is_file()}

    before = cache_state()
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(site),
                 "--split", "test", "--explain", "--out", str(out)]) == 0
    # The checkpoint remembered the encoder: evaluation reused the cache, extracted nothing new.
    assert [c.name for c in (site / CACHE_DIR).iterdir()] == [caches[0].name]
    assert cache_state() == before  # no feature file written or rewritten
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] > 0
    pngs = list((out / "explain" / "site-0").glob("*.png"))
    assert len(pngs) == metrics["n"]
    # Galleries show the real images: a picture with thumbnails is far larger than a text grid.
    assert min(p.stat().st_size for p in pngs) > 5_000

    # The gallery as a person sees it. The default model shows K different tiles per patient,
    # not K copies of one (issue 19): every row reads "min(N, K) of min(N, K)" distinct.
    index = out / "explain" / "site-0" / "index.html"
    page = index.read_text()
    distinct = [(int(d), int(r)) for d, r in re.findall(r"<td>(\d+) of (\d+) \(", page)]
    assert len(distinct) == metrics["n"]
    assert all(d == r for d, r in distinct) and max(r for _, r in distinct) == 4, distinct
    pixels = screenshot(index, tmp_path / "gallery.png")
    assert not is_blank(pixels)
    # At a desktop and a narrow window: every picture loaded and is shown at least 256 px
    # high, no title or caption runs over a picture, nothing needs sideways scrolling, and
    # the legend says what the colours mean.
    for width in (1280, 800):
        facts = probe(index, width)
        assert not facts["broken"], (width, facts["broken"])
        assert len(facts["images"]) == metrics["n"], (width, facts["images"])
        assert min(h for _, h in facts["images"]) >= 256, (width, facts["images"])
        assert not facts["overlaps"], (width, facts["overlaps"][:5])
        assert not facts["overflow"], (width, facts["wide"])
        assert "Colours" in facts["text"] and "selection score" in facts["text"]
        assert "features only" not in facts["text"]
    # A click opens the full-size picture: each thumbnail links to its own PNG.
    assert sorted(re.findall(r'<a href="([^"#]+\.png)"', page)) == sorted(p.name for p in pngs)
