"""One federated round of each MIL method in Flower's simulation engine, on real data
(UCSB breast TMA: 2 training hospitals + 1 held out; HMIL: fashion-hier bags with fine
labels). Checks that the round trains the global model, the held-out site is scored, the
checkpoint rebuilds, and MHIM's payload is its base model's (the teacher stays on site)."""

import csv
import json
from collections import Counter

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from micromil_core.cli import main
from micromil_core.config import build_config
from micromil_core.federated.setup import initial_model_state
from micromil_core.federated.site_task import ModelSpec
from micromil_core.models.registry import build_model
from micromil_core.training.checkpoint import load_checkpoint
from server.simulation import simulate
from tests.heldout import assert_matches_held_out, score_site

pytestmark = pytest.mark.slow

SMALL_ABMIL = {"embed_dims": [32], "attn_dim": 16}
MODELS = [
    ("transmil", {"dim": 16, "n_heads": 2}),
    ("dsmil", {"embed_dims": [16], "q_dim": 16}),
    ("clam-sb", {"embed_dim": 16, "attn_dim": 16, "k_sample": 4}),
    ("mran", {"embed_dims": [32]}),
    ("mhim", {"base": "abmil", "base_params": SMALL_ABMIL, "warmup": 0}),
    ("mhim", {"base": "micromil", "base_params": {"n_clusters": 8, "gnn_hidden": 16},
              "warmup": 0}),
]


@pytest.fixture(scope="module")
def ucsb(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ucsb"
    assert main(["datasets", "prepare", "ucsb-breast", "--out", str(root), "--sites", "2",
                 "--holdout-sites", "1", "--partition", "iid", "--seed", "0"]) == 0
    return root


def _run(root, out, model: dict, data: dict | None = None):
    cfg = build_config({
        "model": model,
        "train": {"lr": 1e-3, "seed": 0, "num_threads": 1},
        "data": data or {},
        "federation": {"rounds": 1, "local_epochs": 1},
        "simulation": {"data_root": str(root)},
    })
    metrics = simulate(cfg, out)
    return cfg, metrics, load_checkpoint(out / "model.pt")


def _assert_trained(cfg, ckpt) -> None:
    spec = ModelSpec(ckpt.model_name, ckpt.in_dim, ckpt.n_classes, ckpt.params)
    start = initial_model_state(spec, cfg.train.seed)
    assert start.keys() == ckpt.state_dict.keys()
    assert any(not torch.equal(start[k], ckpt.state_dict[k]) for k in start), "no training"
    ckpt.build_model()  # the checkpoint alone rebuilds the model


@pytest.mark.parametrize(("name", "params"), MODELS,
                         ids=[f"{n}-{p.get('base', '')}".strip("-") for n, p in MODELS])
def test_one_federated_round(ucsb, tmp_path, name, params):
    cfg, metrics, ckpt = _run(ucsb, tmp_path / "fed", {"name": name, "params": params})
    assert ckpt.model_name == name
    (held_out,) = metrics["per_site"]
    assert_matches_held_out(metrics, tmp_path / "fed" / "model.pt", ucsb / held_out)
    _assert_trained(cfg, ckpt)
    if name == "mhim":  # the wire carries the student only: same arrays as the base model
        base = build_model(params["base"], ckpt.in_dim, ckpt.n_classes, params["base_params"])
        sent = {k.removeprefix("student."): v.shape for k, v in ckpt.state_dict.items()}
        assert sent == {k: v.shape for k, v in base.state_dict().items()}
        history = json.loads((tmp_path / "fed" / "history.json").read_text())["rounds"]
        assert history[0]["bytes_sent"] > 0


def test_hmil_federation_needs_and_uses_the_configured_hierarchy(tmp_path):
    from micromil_core.data.datasets import HIER_CLASSES, HIER_FINDINGS, HIER_FINE_CLASSES
    from micromil_core.errors import ConfigError

    root = tmp_path / "fh"
    assert main(["datasets", "prepare", "fashion-hier", "--out", str(root), "--max-bags", "90",
                 "--sites", "2", "--holdout-sites", "1", "--partition", "iid",
                 "--seed", "0"]) == 0
    group = {f: g for g, members in HIER_FINDINGS.items() for f in members}
    fine_to_coarse = [HIER_CLASSES.index(group[f]) for f in HIER_FINE_CLASSES]
    model = {"name": "hmil", "params": {"embed_dims": [32], "fine_dim": 16, "attn_dim": 16,
                                        "fine_to_coarse": fine_to_coarse}}
    data = {"encoder": "histo-texture"}
    with pytest.raises(ConfigError, match="data.fine_classes"):
        _run(root, tmp_path / "no-hierarchy", model, data)
    cfg, metrics, ckpt = _run(root, tmp_path / "fed", model,
                              {**data, "fine_classes": list(HIER_FINE_CLASSES)})
    assert list(ckpt.params["fine_to_coarse"]) == fine_to_coarse
    (site, per_site), = metrics["per_site"].items()
    assert_matches_held_out(metrics, tmp_path / "fed" / "model.pt", root / site)
    _assert_trained(cfg, ckpt)
    # Metrics at both levels in the federation: each held-out site reports its fine-level
    # metrics (aggregates only) and the server weights them by the fine-labelled patients.
    scored = score_site(tmp_path / "fed" / "model.pt", root / site)
    known = scored.y_fine >= 0
    y_fine, fine_pred = scored.y_fine[known], scored.fine_probs[known].argmax(axis=1)
    assert per_site["fine_n"] == per_site["num-examples"] == known.sum() > 0
    assert per_site["fine_accuracy"] == pytest.approx((fine_pred == y_fine).mean(), abs=1e-9)
    assert metrics["fine_accuracy"] == pytest.approx(per_site["fine_accuracy"])
    # The class-conditional fine metrics leave the site only if every fine class present
    # there has at least 5 patients (small-count guard).
    with open(root / site / "patients.csv") as fh:
        fine_counts = Counter(row["fine_label"] for row in csv.DictReader(fh) if row["fine_label"])
    if min(fine_counts.values()) >= 5:
        balanced = balanced_accuracy_score(y_fine, fine_pred)
        assert metrics["fine_balanced_accuracy"] == pytest.approx(balanced, abs=1e-9)
    else:
        assert "fine_balanced_accuracy" not in per_site
        assert "fine_balanced_accuracy" in metrics["suppressed"], (fine_counts, metrics)
