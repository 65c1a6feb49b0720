"""The representative-diversity measure (micromil_core.training.mechanism): what it
counts, and that evaluate reports it for MicroMIL only."""

import json

import pytest
import torch

from micromil_core.data.bag import Bag
from micromil_core.models.registry import build_model
from micromil_core.training.mechanism import (
    bag_picks,
    representative_diversity,
    representative_picks,
)


def test_bag_picks_counts_distinct_instances_against_what_was_possible():
    assert bag_picks([3] * 36, 40) == (1, 36)  # a graph of copies
    assert bag_picks(list(range(36)), 40) == (36, 36)
    assert bag_picks([0, 1, 2, 0, 1, 2, 0, 1], 3) == (3, 3)  # a bag smaller than K: all picked


def test_bag_picks_counts_clusters_shown_by_their_own_member():
    # 6 instances owned by clusters 0, 0, 1, 1, 2, 2; K = 4 (cluster 3 owns none)
    owner = [0, 0, 1, 1, 2, 2]
    assert bag_picks([1, 2, 5, 0], 6, owner) == (4, 4, 3, 3)  # every occupied cluster: own member
    assert bag_picks([4, 4, 4, 4], 6, owner) == (1, 4, 1, 3)  # one instance for all: only its owner
    # distinct but not cluster-specific: cluster 0 shows cluster 1's instance, and so on
    assert bag_picks([2, 4, 0, -1], 6, owner) == (3, 4, 0, 3)


def test_summary_over_bags():
    picks = [(1, 36), (36, 36), (18, 36), (1, 1)]
    div = representative_diversity(picks)
    assert div["bags"] == 4
    assert div["mean"] == pytest.approx((1 / 36 + 1 + 0.5 + 1) / 4)
    assert div["median"] == pytest.approx((0.5 + 1) / 2)
    # the one-instance bag has no room for a second pick: not counted as collapsed
    assert div["single_fraction"] == pytest.approx(1 / 3)
    assert "cluster_coverage" not in div  # no assignments given


def test_summary_reports_cluster_coverage_when_assignments_are_known():
    div = representative_diversity([(4, 4, 3, 3), (3, 4, 0, 3)])
    assert div["cluster_coverage"] == pytest.approx(0.5)
    assert div["mean"] == pytest.approx((1 + 0.75) / 2)


def _bags(n_bags=4, n=30, dim=8):
    g = torch.Generator().manual_seed(0)
    return [Bag(f"p{i}", torch.randn(n, dim, generator=g), i % 2) for i in range(n_bags)]


def test_micromil_reports_picks_and_other_models_none():
    bags = _bags()
    micromil = build_model("micromil", 8, 2, {"n_clusters": 6})
    picks = representative_picks(micromil, bags, torch.device("cpu"))
    assert len(picks) == 4 and all(1 <= d <= room == 6 for d, room, *_ in picks)
    assert all(0 <= c <= occ <= 6 for *_, c, occ in picks)  # MicroMIL gives its assignments
    assert picks == representative_picks(micromil, bags, torch.device("cpu"))  # deterministic
    assert representative_picks(build_model("abmil", 8, 2, {}), bags, torch.device("cpu")) is None


def test_evaluate_and_cv_write_the_diversity_of_a_micromil_model(tmp_path):
    from micromil_core.cli import main
    from tests.conftest import write_site

    site = write_site(tmp_path / "site", n_patients=12)
    run = tmp_path / "run"
    assert main(["train", "--data", str(site), "--model", "micromil", "--set", "model.params.n_clusters=4",
                 "--set", "train.epochs=2", "--out", str(run)]) == 0
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(site),
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    div = metrics["representative_diversity"]
    assert div["bags"] == 12 and 0 < div["mean"] <= 1 and 0 <= div["single_fraction"] <= 1
    assert metrics["per_site"]["site"]["representative_diversity"] == div
    assert main(["cv", "--data", str(site), "--model", "micromil", "--folds", "3",
                 "--set", "model.params.n_clusters=4", "--set", "train.epochs=2",
                 "--out", str(tmp_path / "cv")]) == 0
    cv = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    assert cv["representative_diversity"]["bags"] == 12
    assert all("representative_diversity" in fold for fold in cv["per_fold"])
