"""What a first user met (issue 21's table), one test per row: each failed before the fix."""

import csv
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from micromil_core.cli import main
from micromil_core.io import write_json_atomic
from tests.conftest import write_site


def _relabel(site, row_index, label):
    path = site / "patients.csv"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    rows[row_index]["label"] = label
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def ucsb(demo_ucsb, tmp_path):
    root = tmp_path / "ucsb"
    shutil.copytree(demo_ucsb, root)
    return root


def test_mistyped_label_is_an_error_naming_row_and_fix(tiny_site, capsys):
    _relabel(tiny_site, 3, "malignnat")  # row 5 of the file (header = row 1)
    assert main(["check-site", str(tiny_site)]) == 1  # problems found
    out = capsys.readouterr().out
    assert "row 5: label 'malignnat'" in out and "did you mean 'malignant'" in out


def test_label_outside_the_data_roots_classes_stops_training(ucsb, tmp_path, capsys):
    _relabel(ucsb / "site-1", 0, "malignant")
    assert main(["train", "--data-root", str(ucsb), "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "site-1" in err and "row 2" in err and "'malignant'" in err
    assert not (tmp_path / "r" / "model.pt").exists()  # no 3-class model


def test_simulation_names_the_site_with_the_stray_label(ucsb, tmp_path, capsys):
    _relabel(ucsb / "site-2", 0, "malignant")
    code = main(["simulate", "--data-root", str(ucsb), "--rounds", "1", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 2 and "site-2:" in err and "'malignant'" in err
    assert "site-0:" not in err and "site-1:" not in err  # the sites without it are not blamed


def test_an_earlier_run_is_kept_without_overwrite(tiny_site, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_site), "--model", "mean-pool", "--epochs", "1", "--out", str(out)]
    assert main(args) == 0
    first = (out / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (out / "model.pt").read_bytes() == first
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    assert (out / "model.pt").read_bytes() != first


def test_unwritable_out_is_refused_before_any_work(tiny_site, capsys, caplog):
    caplog.set_level(logging.INFO)
    code = main(["train", "--data", str(tiny_site), "--epochs", "1", "--out", "/proc/micromil-run"])
    assert code == 2 and "cannot write to /proc/micromil-run" in capsys.readouterr().err
    assert not any("epoch" in r.getMessage() for r in caplog.records)  # nothing trained


def test_closed_pipe_ends_quietly():
    # The reader is gone before the command writes (as after `| head` has read its line).
    proc = subprocess.Popen([sys.executable, "-m", "micromil_core.cli", "models"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""  # 128 + SIGPIPE, as Unix tools report


def test_garbage_feature_file_gives_no_unsafe_advice(tiny_site, tmp_path, capsys):
    (tiny_site / "features" / "p001.pt").write_bytes(b"\x80\x02not a tensor at all")
    assert main(["train", "--data", str(tiny_site), "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "p001.pt" in err and "weights_only" not in err and "refused" in err


def test_empty_image_says_it_is_empty(tmp_path, capsys):
    from micromil_core.encoders.images import read_image
    from micromil_core.errors import ImageError

    empty = tmp_path / "x.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        read_image(empty)


def test_json_is_strict(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"auc": float("nan"), "ci": [0.1, float("inf")]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auc": None, "ci": [0.1, None]}


def test_demo_split_validation_holds_each_class(demo_ucsb):
    from micromil_core.data.data_root import read_sites_yaml

    for site in read_sites_yaml(demo_ucsb).train_sites:
        with open(site / "patients.csv") as fh:
            rows = list(csv.DictReader(fh))
        held = {r["label"] for r in rows if r["split"] in ("train", "val")}
        assert {r["label"] for r in rows if r["split"] == "val"} == held, site.name


def test_min_per_class_validation_split():
    from micromil_core.data.splits import train_val_split

    labels = np.array([0] * 9 + [1] * 2)
    plain = [train_val_split(np.arange(11), labels, 0.1, s)[1] for s in range(20)]
    assert any(set(labels[v]) == {0} for v in plain)  # a plain stratified draw can miss class 1
    for s in range(20):
        train, val = train_val_split(np.arange(11), labels, 0.1, s, min_per_class=1)
        assert set(labels[val]) == {0, 1} and set(labels[train]) == {0, 1}


def test_simulation_says_what_it_is_doing_before_the_engine(ucsb, caplog):
    from micromil_core.config import load_config
    from micromil_core.federated.simulated_sites import resolve_sites
    from server.simulation import preflight

    caplog.set_level(logging.INFO, logger="micromil.simulate")
    cfg = load_config(None, [f"simulation.data_root={ucsb}"])
    preflight(cfg, resolve_sites(cfg))
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("pre-flight 1/4: checking site-0") and said[-1].startswith("pre-flight passed")


def test_one_bootstrap_for_one_model_and_patients(ucsb, tmp_path):
    """The site's AUC interval in a federation round equals `micromil evaluate`'s."""
    from micromil_core.config import DataConfig, TrainConfig
    from micromil_core.federated.site_task import (
        ModelSpec,
        SiteSettings,
        evaluate_round,
        load_runtime,
    )
    from micromil_core.training.checkpoint import load_checkpoint

    run = tmp_path / "m"
    assert main(["train", "--data-root", str(ucsb), "--model", "mean-pool", "--epochs", "2",
                 "--out", str(run)]) == 0
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(ucsb / "site-3"),
                 "--out", str(tmp_path / "e")]) == 0
    interval = json.loads((tmp_path / "e" / "metrics.json").read_text())["ci95"]["auc"]
    ckpt = load_checkpoint(run / "model.pt")
    spec = ModelSpec(ckpt.model_name, ckpt.in_dim, ckpt.n_classes, ckpt.params)
    site_3 = SiteSettings("site-3", ucsb / "site-3", "holdout")
    runtime = load_runtime(site_3, DataConfig(), TrainConfig(), list(ckpt.classes))
    site = evaluate_round(runtime, spec, ckpt.state_dict, ckpt.scaler)
    assert [site["auc_ci_low"], site["auc_ci_high"]] == pytest.approx(interval)


def test_write_site_fixture_is_unchanged(tmp_path):
    # The rows above rely on write_site's two labels; a third would hide the typo check.
    site = write_site(tmp_path / "s")
    with open(site / "patients.csv") as fh:
        assert {r["label"] for r in csv.DictReader(fh)} == {"benign", "malignant"}


def test_long_commands_show_progress(tiny_site, tmp_path, capsys):
    """`datasets prepare` and `evaluate --explain` show a bar while they work (on stderr)."""
    assert main(["datasets", "prepare", "musk1", "--out", str(tmp_path / "musk1")]) == 0
    assert "writing site-0" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_site), "--model", "mean-pool", "--epochs", "1",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(tiny_site), "--explain",
                 "--out", str(tmp_path / "e")]) == 0
    assert "explaining site-a" in capsys.readouterr().err
