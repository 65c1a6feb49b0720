"""Every bad input named in the spec: one clear error (file/row/value + fix), exit code 2,
and nothing already computed or saved is lost."""

import csv
import shutil

import numpy as np
import pytest
import torch

from micromil_core.cli import main
from tests.conftest import write_site


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def train_args(*sites, out, model="gated-abmil"):
    return ["train", "--data", *sites, "--model", model, "--epochs", "1", "--out", out]


def rewrite_csv(site, mutate):
    path = site / "patients.csv"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    rows = mutate(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_missing_patients_csv(tmp_path, capsys):
    site = tmp_path / "empty-site"
    site.mkdir()
    code, err = run(train_args(site, out=tmp_path / "r"), capsys)
    assert code == 2 and "patients.csv" in err and str(site) in err


def test_patients_csv_without_label_column(tiny_site, tmp_path, capsys):
    (tiny_site / "patients.csv").write_text("patient_id,diagnosis\np000,benign\n")
    code, err = run(train_args(tiny_site, out=tmp_path / "r"), capsys)
    assert code == 2 and "label" in err and "patients.csv" in err


def test_unknown_label_against_checkpoint(tmp_path, capsys):
    site = write_site(tmp_path / "a")
    assert main([str(a) for a in train_args(site, out=tmp_path / "r")]) == 0
    other = write_site(tmp_path / "b")
    rewrite_csv(other, lambda rows: [{**r, "label": "malignent"} if i == 3 else r for i, r in enumerate(rows)])
    code, err = run(["evaluate", "--model", tmp_path / "r" / "model.pt", "--data", other,
                     "--out", tmp_path / "e"], capsys)
    assert code == 2 and "malignent" in err and "row 5" in err  # header is row 1


def test_patient_without_features_or_images(tiny_site, tmp_path, capsys):
    (tiny_site / "features" / "p004.pt").unlink()
    code, err = run(train_args(tiny_site, out=tmp_path / "r"), capsys)
    assert code == 2 and "p004" in err and "--encoder NAME" in err


def test_image_site_without_encoder_names_the_flag(tmp_path, capsys):
    # Images are there but no encoder was named: the fix is the flag, not `extract` (whose
    # cache a run without --encoder does not read).
    site = _image_site(tmp_path / "img")
    code, err = run(train_args(site, out=tmp_path / "r"), capsys)
    assert code == 2 and "images/p0/" in err and "--encoder" in err
    assert main([str(a) for a in train_args(site, out=tmp_path / "r")] + ["--encoder", "histo-texture"]) == 0


@pytest.mark.parametrize(
    "content, match",
    [(torch.zeros(0, 6), "empty"), (torch.full((3, 6), float("nan")), "NaN")],
    ids=["empty-bag", "nan-features"],
)
def test_bad_feature_values(tiny_site, tmp_path, capsys, content, match):
    torch.save(content, tiny_site / "features" / "p002.pt")
    code, err = run(train_args(tiny_site, out=tmp_path / "r"), capsys)
    assert code == 2 and match in err and "p002.pt" in err


def test_corrupt_feature_file(tiny_site, tmp_path, capsys):
    (tiny_site / "features" / "p001.pt").write_bytes(b"\x00garbage")
    code, err = run(train_args(tiny_site, out=tmp_path / "r"), capsys)
    assert code == 2 and "p001.pt" in err


def test_mismatched_feature_dimension_between_sites(tmp_path, capsys):
    a = write_site(tmp_path / "a", dim=6)
    b = write_site(tmp_path / "b", dim=5)
    code, err = run(train_args(a, b, out=tmp_path / "r"), capsys)
    assert code == 2 and "expected 6" in err and str(b) in err


def test_mismatched_dimension_against_checkpoint(tmp_path, capsys):
    a = write_site(tmp_path / "a", dim=6)
    assert main([str(a) for a in train_args(a, out=tmp_path / "r")]) == 0
    b = write_site(tmp_path / "b", dim=4)
    code, err = run(["evaluate", "--model", tmp_path / "r" / "model.pt", "--data", b,
                     "--out", tmp_path / "e"], capsys)
    assert code == 2 and "expected 6" in err


def test_unknown_model_and_encoder(tiny_site, tmp_path, capsys):
    code, err = run(train_args(tiny_site, out=tmp_path / "r", model="micromill"), capsys)
    assert code == 2 and "micromill" in err and "gated-abmil" in err
    code, err = run(["extract", "--data", tiny_site, "--encoder", "resnet-from-nowhere"], capsys)
    assert code == 2 and "resnet-from-nowhere" in err and "histo-texture" in err


def test_failed_run_keeps_previous_checkpoint(tmp_path, capsys):
    site = write_site(tmp_path / "a")
    out = tmp_path / "r"
    assert main([str(a) for a in train_args(site, out=out)]) == 0
    before = (out / "model.pt").read_bytes()
    torch.save(torch.full((2, 6), float("inf")), site / "features" / "p000.pt")
    code, _ = run(train_args(site, out=out), capsys)
    assert code == 2
    assert (out / "model.pt").read_bytes() == before


def _image_site(root, n=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pid = f"p{i}"
        folder = root / "images" / pid
        folder.mkdir(parents=True)
        for j in range(3):
            arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{j}.png")
        rows.append(f"{pid},{'benign' if i % 2 else 'malignant'}")
    (root / "patients.csv").write_text("patient_id,label\n" + "\n".join(rows) + "\n")
    return root


def test_corrupt_image_keeps_feature_cache(tmp_path, capsys):
    site = _image_site(tmp_path / "img")
    assert main(["extract", "--data", str(site), "--encoder", "histo-texture"]) == 0
    cache = next((site / "cache").iterdir())
    saved = {p.name: p.read_bytes() for p in cache.iterdir()}
    bad = site / "images" / "p2" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, err = run(["extract", "--data", site, "--encoder", "histo-texture"], capsys)
    assert code == 2 and str(bad) in err
    for name, data in saved.items():  # the other patients' cache and the manifest survive
        if name != "p2.pt":
            assert (cache / name).read_bytes() == data or name == "manifest.json"
    assert (cache / "p0.pt").read_bytes() == saved["p0.pt"]
    shutil.rmtree(site)
