"""HMIL (hierarchical labels): model, losses, schedules, fine->coarse map, fine metrics,
DP refusal, and the real ``fashion-hier`` dataset (tiny)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from micromil_core.config import build_config
from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.datasets import (
    FASHION_MNIST_DIR,
    HIER_BACKGROUND,
    HIER_CLASSES,
    HIER_FINDINGS,
    HIER_FINE_CLASSES,
    make_fashion_hier_bags,
    prepare_dataset,
)
from micromil_core.data.site import load_site
from micromil_core.errors import ConfigError
from micromil_core.models import build_model
from micromil_core.models.hmil import (
    HMIL,
    attention_alignment_loss,
    bag_alignment_loss,
    supervised_contrastive_loss,
)
from micromil_core.training.fitting import train_pooled, with_fine_to_coarse
from micromil_core.training.loading import load_sites
from micromil_core.training.metrics import METRIC_KEYS, fine_metrics, summarize_folds
from micromil_core.training.score import evaluate_checkpoint, predict_checkpoint

D = 6
MAP = (0, 0, 1, 2, 2)  # 5 fine classes in 3 coarse classes
SMALL = {"fine_to_coarse": "0,0,1,2,2", "embed_dims": "16", "fine_dim": 8, "attn_dim": 8}


def make_hmil(seed: int = 0, **params) -> HMIL:
    torch.manual_seed(seed)
    return build_model("hmil", D, 3, {**SMALL, **params})


def hier_bags(n: int = 15, seed: int = 0, unknown_every: int = 0) -> list[Bag]:
    """Bags whose fine class f puts a key instance at +3 on feature f (learnable)."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        fine = i % len(MAP)
        x = torch.randn(3 + i % 4, D, generator=g)  # (N, D)
        x[0, fine] += 3.0
        known = not (unknown_every and i % unknown_every == 0)
        bags.append(Bag(f"p{i:02d}", x, MAP[fine], fine if known else None))
    return bags


@pytest.mark.parametrize("scorer", ["per-class", "shared"])
def test_shapes_padding_and_fine_probs(scorer: str) -> None:
    model = make_hmil(fine_scorer=scorer).eval()
    batch = collate_bags(hier_bags(4))
    pred = model.predict_batch(batch)
    assert pred.probs.shape == (4, 3)
    fine = pred.extras["fine_probs"]
    assert fine.shape == (4, len(MAP)) and model.n_fine == len(MAP)
    torch.testing.assert_close(fine.sum(-1), torch.ones(4))
    assert pred.instance_scores.shape == batch.mask.shape
    assert torch.all(pred.instance_scores[~batch.mask] == 0)
    out = model.run(batch.x, batch.mask)
    assert out.coarse_attn.shape == (4, 3, batch.x.shape[1])
    assert out.fine_attn.shape == (4, len(MAP), batch.x.shape[1])


def test_eval_is_deterministic() -> None:
    model = make_hmil().eval()
    batch = collate_bags(hier_bags(5))
    a, b = model.predict_batch(batch), model.predict_batch(batch)
    assert torch.equal(a.probs, b.probs)
    assert torch.equal(a.extras["fine_probs"], b.extras["fine_probs"])


def test_every_loss_part_is_finite_and_the_total_decreases() -> None:
    batch = collate_bags(hier_bags(15))
    model = make_hmil(dropout=0.0)
    model.set_progress(0.5)  # every term active: alpha 0.75, contrastive weight 0.25
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> tuple[float, dict]:
        model.eval()
        with torch.no_grad():
            loss, parts = model.loss_batch(batch)
        return float(loss), parts

    before, parts = eval_loss()
    for key in ("ce", "ce_fine", "align_bag", "align_inst", "contrastive"):
        assert math.isfinite(parts[key]) and parts[key] > 0, key
    for _ in range(60):
        model.train()
        opt.zero_grad()
        model.loss_batch(batch)[0].backward()
        opt.step()
    after, parts_after = eval_loss()
    assert after < 0.6 * before, (before, after)
    assert parts_after["ce_fine"] < parts["ce_fine"]


def test_bags_without_fine_label_contribute_only_coarse_terms() -> None:
    model = make_hmil().eval()
    bags = hier_bags(6)
    unknown = [Bag(b.patient_id, b.features, b.label, None) for b in bags]
    loss, parts = model.loss_batch(collate_bags(unknown))
    assert parts["ce_fine"] == 0 and parts["contrastive"] == 0
    batch = collate_bags(unknown)
    coarse_only, _ = model.loss(batch.x, batch.mask, batch.y)
    torch.testing.assert_close(loss, coarse_only)
    # Mixed batch: fine CE only over the known ones; one known bag -> no contrastive pair.
    mixed = [bags[0]] + unknown[1:]
    _, parts = model.loss_batch(collate_bags(mixed))
    assert parts["ce_fine"] > 0 and parts["contrastive"] == 0


def test_bag_alignment_is_near_zero_when_fine_agrees_with_coarse() -> None:
    membership = torch.nn.functional.one_hot(torch.tensor(MAP), 3).float()  # (F, C)
    y = torch.tensor([0, 1, 2])
    agree = torch.full((3, len(MAP)), -20.0)
    agree[0, 1] = agree[1, 2] = agree[2, 3] = 20.0  # fine classes inside the true coarse
    disagree = torch.full((3, len(MAP)), -20.0)
    disagree[0, 4] = disagree[1, 0] = disagree[2, 2] = 20.0
    assert float(bag_alignment_loss(agree, membership, y)) < 1e-6
    assert float(bag_alignment_loss(disagree, membership, y)) > 10.0
    # Probability split between two fine classes of the right coarse class is still aligned.
    split = torch.full((1, len(MAP)), -20.0)
    split[0, 0] = split[0, 1] = 20.0
    assert float(bag_alignment_loss(split, membership, torch.tensor([0]))) < 1e-6


def test_attention_alignment() -> None:
    membership = torch.nn.functional.one_hot(torch.tensor([0, 0, 1]), 2).float()  # (F=3, C=2)
    a_c = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]])  # (1, 2, 4)
    same = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.5, 0.5]]])  # (1, 3, 4)
    other = torch.tensor([[[0, 0, 1.0, 0], [0, 0, 0, 1.0], [1.0, 0, 0, 0]]])
    assert float(attention_alignment_loss(a_c, same, membership)) < 1e-6
    assert float(attention_alignment_loss(a_c, other, membership)) == pytest.approx(1.0)


def test_supervised_contrastive_loss() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    good = supervised_contrastive_loss(clustered, labels, 0.1)
    bad = supervised_contrastive_loss(mixed, labels, 0.1)
    assert torch.isfinite(good) and float(good) < float(bad)
    # No anchor (single bag, or all labels distinct): exactly 0, no NaN.
    assert float(supervised_contrastive_loss(clustered[:1], labels[:1], 0.1)) == 0.0
    assert float(supervised_contrastive_loss(clustered[:3:2], labels[:3:2], 0.1)) == 0.0
    emb = clustered.clone().requires_grad_(True)
    supervised_contrastive_loss(emb, labels, 0.5).backward()
    assert torch.isfinite(emb.grad).all()


def test_schedules() -> None:
    model = make_hmil()
    expected = {0.0: (1.0, 1.0), 0.5: (0.75, 0.1), 1.0: (0.0, 1.0)}
    for progress, (alpha, temp) in expected.items():
        model.set_progress(progress)
        assert model.curriculum_weight() == pytest.approx(alpha)
        assert model.temperature() == pytest.approx(temp)
        _, parts = model.loss_batch(collate_bags(hier_bags(6)))
        assert parts["alpha"] == pytest.approx(alpha)


def test_bad_params_and_labels_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="coarse class"):
        build_model("hmil", D, 2, {"fine_to_coarse": "0,1,2"})
    with pytest.raises(ConfigError, match="no fine class"):
        build_model("hmil", D, 3, {"fine_to_coarse": "0,0,1"})
    with pytest.raises(ConfigError, match="temp_max"):
        build_model("hmil", D, 3, {"temp_min": 0.5, "temp_max": 0.2})
    assert build_model("hmil", D, 3).n_fine == 3  # empty map: one fine class per coarse
    model = make_hmil()
    bags = hier_bags(2)
    with pytest.raises(ConfigError, match="fine label index 7"):
        model.loss_batch(collate_bags([Bag("a", bags[0].features, 0, 7)]))
    with pytest.raises(ConfigError, match="fine_to_coarse maps to coarse class 2"):
        model.loss_batch(collate_bags([Bag("a", bags[0].features, 0, 4)]))


def test_dp_sgd_refuses_hmil() -> None:
    from micromil_core.privacy.dp_sgd import make_private_model

    with pytest.raises(ConfigError, match="couples the patients"):
        make_private_model(make_hmil())


# --- fine -> coarse map and fine metrics in the pipeline ------------------------------------


def write_hier_site(root: Path, fines: list[str], coarse_of: dict[str, str], seed: int = 0) -> Path:
    """A feature site with a ``fine_label`` column; fine class k has a key at feature k."""
    g = torch.Generator().manual_seed(seed)
    order = sorted(coarse_of)
    (root / "features").mkdir(parents=True)
    rows = []
    for i, fine in enumerate(fines):
        x = torch.randn(4, D, generator=g)
        x[0, order.index(fine)] += 3.0
        torch.save(x, root / "features" / f"p{i:02d}.pt")
        split = ("train", "train", "train", "val", "test")[i % 5]
        rows.append([f"p{i:02d}", coarse_of[fine], split, fine])
    with open(root / "patients.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "label", "split", "fine_label"])
        writer.writerows(rows)
    return root


COARSE_OF = {"adh": "atypical", "dcis": "malignant", "fea": "atypical", "ic": "malignant"}


def _cfg(model: str = "hmil", **params):
    raw = {
        "model": {"name": model, "params": params},
        "train": {"epochs": 2, "num_threads": 1, "batch_size": 4, "lr": 1e-3, "device": "cpu"},
    }
    return build_config(raw)


def test_fine_to_coarse_is_derived_from_training_patients(tmp_path: Path) -> None:
    site = load_site(write_hier_site(tmp_path / "s", list(COARSE_OF) * 3, COARSE_OF))
    bags = [
        Bag(r.patient_id, torch.zeros(1, D), site.label_index(r), site.fine_label_index(r))
        for r in site.patients
    ]
    cfg = with_fine_to_coarse(_cfg(), bags, site)
    # fine classes (adh, dcis, fea, ic) -> coarse (atypical=0, malignant=1)
    assert list(cfg.model.params["fine_to_coarse"]) == [0, 1, 0, 1]
    assert with_fine_to_coarse(_cfg("abmil"), bags, site) == _cfg("abmil")  # no such param
    explicit = _cfg(fine_to_coarse="1,0,1,0")
    assert with_fine_to_coarse(explicit, bags, site) == explicit  # the config wins
    clash = bags + [Bag("x", torch.zeros(1, D), 1, 0)]  # adh seen as malignant too
    with pytest.raises(
        ConfigError, match="'adh' occurs with coarse labels 'atypical' and 'malignant'"
    ):
        with_fine_to_coarse(_cfg(), clash, site)
    missing = [b for b in bags if b.fine_label != 2]
    with pytest.raises(ConfigError, match="'fea' has no training patient"):
        with_fine_to_coarse(_cfg(), missing, site)


def test_fine_metrics() -> None:
    y = np.array([0, 1, 2, 2, -1])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.0, 0.0, 1.0]]
    )
    m = fine_metrics(y, probs)
    assert m["fine_n"] == 4 and m["fine_accuracy"] == pytest.approx(0.75)
    assert m["fine_balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["fine_macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert 0 < m["fine_auc"] <= 1
    assert fine_metrics(np.array([-1, -1]), probs[:2]) == {}
    assert math.isnan(fine_metrics(np.array([1, 1]), probs[:2])["fine_auc"])
    fold = {**dict.fromkeys(METRIC_KEYS, 0.5), **m}
    assert summarize_folds([fold, fold])["fine_accuracy_mean"] == pytest.approx(0.75)
    assert "fine_accuracy_mean" not in summarize_folds([fold, dict.fromkeys(METRIC_KEYS, 0.5)])


def test_train_and_evaluate_write_fine_metrics(tmp_path: Path) -> None:
    site = write_hier_site(tmp_path / "s", list(COARSE_OF) * 5, COARSE_OF)
    metrics = train_pooled([site], _cfg(), tmp_path / "run")
    for key in ("fine_accuracy", "fine_balanced_accuracy", "fine_macro_f1", "fine_auc"):
        assert key in metrics["test"] and key in metrics["validation"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["fine_n"] == 4
    ev = evaluate_checkpoint(tmp_path / "run" / "model.pt", [site], tmp_path / "ev", split="test")
    assert ev["fine_accuracy"] == pytest.approx(saved["test"]["fine_accuracy"])
    assert "fine_accuracy" in ev["per_site"]["s"]
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    fine_cols = [f"prob_fine_{c}" for c in ("adh", "dcis", "fea", "ic")]
    assert len(rows) == 4 and all(set(fine_cols) <= set(r) for r in rows)
    for r in rows:
        assert r["fine_label"] in COARSE_OF
        assert sum(float(r[c]) for c in fine_cols) == pytest.approx(1.0, abs=1e-4)
    # Scoring the same patients without any label gives the same fine probabilities and
    # names the most probable fine class.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "features").symlink_to(site / "features")
    ids = [r["patient_id"] for r in rows]
    (tmp_path / "new" / "patients.csv").write_text("patient_id\n" + "\n".join(ids) + "\n")
    predict_checkpoint(tmp_path / "run" / "model.pt", [tmp_path / "new"], tmp_path / "pred")
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        scored = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in scored] == ids
    for r, e in zip(scored, rows, strict=True):
        probs = [float(r[c]) for c in fine_cols]
        assert probs == pytest.approx([float(e[c]) for c in fine_cols], abs=1e-6)
        assert r["predicted_fine"] == ("adh", "dcis", "fea", "ic")[int(np.argmax(probs))]
        assert r["label"] == ""
    # A flat model gets no fine metrics.
    flat = train_pooled([site], _cfg("abmil", embed_dims="8", attn_dim=4), tmp_path / "flat")
    assert "fine_accuracy" not in flat["test"]


def test_load_sites_shares_one_fine_vocabulary(tmp_path: Path) -> None:
    a = write_hier_site(tmp_path / "a", ["adh", "dcis", "ic"] * 2, COARSE_OF)
    b = write_hier_site(tmp_path / "b", ["fea", "dcis"] * 2, COARSE_OF)
    sites = load_sites([a, b], _cfg().data, torch.device("cpu"))
    assert [s.site.fine_classes for s in sites] == [("adh", "dcis", "fea", "ic")] * 2
    dcis = [bag.fine_label for s in sites for bag in s.bags if bag.patient_id == "p01"]
    assert dcis == [1, 1]


# --- the real fashion-hier dataset ----------------------------------------------------------


def test_fashion_hier_bag_composition() -> None:
    rng = np.random.default_rng(0)
    labels = {pool: np.repeat(np.arange(10), 200) for pool in ("train", "test")}
    bags = make_fashion_hier_bags(70, labels, rng)
    assert sum(b.pool == "test" for b in bags) == round(70 * 0.25)
    fine_mnist = {f: m for group in HIER_FINDINGS.values() for f, m in group.items()}
    used = {"train": [], "test": []}
    for b in bags:
        classes = labels[b.pool][b.image_rows]
        fine = HIER_FINE_CLASSES[b.fine_label]
        n_find = int((classes == fine_mnist[fine]).sum())
        assert 1 <= n_find <= 3 and 3 <= len(classes) - n_find <= 6
        assert set(classes.tolist()) - {fine_mnist[fine]} <= set(HIER_BACKGROUND)
        assert fine in HIER_FINDINGS[HIER_CLASSES[b.label]]
        used[b.pool] += b.image_rows.tolist()
    assert all(len(rows) == len(set(rows)) for rows in used.values())  # no image reused
    counts = np.bincount([b.fine_label for b in bags if b.pool == "train"])
    assert counts.max() - counts.min() <= 1  # fine classes balanced


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_prepare_fashion_hier_tiny(tmp_path: Path) -> None:
    root = prepare_dataset("fashion-hier", tmp_path / "hier", max_bags=40, seed=3)
    assert root.classes == HIER_CLASSES and root.fine_classes == HIER_FINE_CLASSES
    site_dir = root.sites[0].path
    with open(site_dir / "patients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["patient_id", "label", "split", "fine_label"]
    assert len(rows) == 40
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for r in rows:
        assert r["fine_label"] in HIER_FINDINGS[r["label"]]
        n_images = len(list((site_dir / "images" / r["patient_id"]).glob("*.png")))
        assert 4 <= n_images <= 9
    site = load_site(site_dir)
    assert site.classes == HIER_CLASSES and site.fine_classes == HIER_FINE_CLASSES
    again = prepare_dataset("fashion-hier", tmp_path / "again", max_bags=40, seed=3)
    assert (again.sites[0].path / "patients.csv").read_text() == (
        site_dir / "patients.csv"
    ).read_text()
