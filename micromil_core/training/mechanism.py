"""Measures of whether a model's mechanism does what it claims, beside its final score.

MicroMIL picks one representative instance per cluster (K of them) and builds its graph
over those; if the K picks are copies of one or two instances, the graph is a graph of
copies and the GNN sees one instance. ``representative_diversity`` measures that per bag:
distinct representatives / min(N, K), 1.0 when every pick is a different instance (or
every instance of a bag smaller than K is picked).

Distinct picks are not yet cluster-specific ones: a draw that took the K instances with
the highest shared score would be perfectly diverse and still ignore the clusters. So
``cluster_coverage`` asks, per bag, of the clusters that own at least one of its instances
(hard assignment argmax_k q_nk): how many are represented by one of their own members?
1.0 when every occupied cluster shows its own instance; about 1 / occupied when one
instance stands for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from micromil_core.data.bag import Bag, collate_bags
from micromil_core.models.base import Prediction

# (distinct representatives, min(N, K)) of one bag, and where the cluster assignments are
# known, (..., occupied clusters represented by their own member, occupied clusters)
Picks = tuple[int, ...]


def bag_picks(selected: Sequence[int], n_instances: int, owner: Sequence[int] | None = None) -> Picks:
    """(distinct instances among ``selected``, the most there could be: min(N, K)), plus
    (clusters whose pick is one of their own members, clusters owning an instance) when
    ``owner`` (N,), each instance's hard cluster, is given. ``selected[k]`` is cluster k's
    pick.

    An index of -1 is a cluster without a node (MicroMIL's "distinct" draw on a bag
    smaller than K); it is not an instance.
    """
    picked = [int(i) for i in selected]
    base = len({i for i in picked if i >= 0}), min(n_instances, len(picked))
    if owner is None:
        return base
    own = [int(o) for o in owner]
    covered = sum(1 for k, i in enumerate(picked) if i >= 0 and own[i] == k)
    return (*base, covered, len(set(own)))


def representative_picks(model: Any, bags: Sequence[Bag], device: torch.device) -> list[Picks] | None:
    """``bag_picks`` of every bag, in ``bags`` order; None for a model that selects no
    representatives (every model but MicroMIL). One bag per forward pass, so no padded
    instance can be counted."""
    model.eval()
    picks = []
    for bag in bags:
        bag_pick = prediction_picks(model.predict_batch(collate_bags([bag]).to(device)), bag.num_instances)
        if bag_pick is None:
            return None
        picks.append(bag_pick)
    return picks


def prediction_picks(pred: Prediction, n_instances: int) -> Picks | None:
    """``bag_picks`` of a one-bag ``Prediction`` (its hard cluster per instance from the
    soft assignments, where the model gives them); None when it selects no representatives."""
    if pred.selected is None:
        return None
    q = (pred.extras or {}).get("assignments")
    owner = q[0, :n_instances].argmax(-1).tolist() if q is not None else None
    return bag_picks(pred.selected[0].tolist(), n_instances, owner)


def representative_diversity(picks: Sequence[Picks]) -> dict[str, Any]:
    """{mean, median, single_fraction, bags} of distinct / min(N, K) over bags, and
    ``cluster_coverage`` (mean over bags of own-member clusters / occupied clusters) when
    every bag's picks carry the assignments.

    ``single_fraction``: the share of bags with room for more than one pick whose
    representatives are all ONE instance (a graph of copies).
    """
    distinct = np.array([p[0] for p in picks], dtype=float)
    room = np.array([p[1] for p in picks], dtype=float)
    ok = room > 0
    share = distinct[ok] / room[ok]
    many = room > 1
    out: dict[str, Any] = {
        "mean": float(share.mean()) if share.size else float("nan"),
        "median": float(np.median(share)) if share.size else float("nan"),
        "single_fraction": float(((distinct == 1) & many).sum() / many.sum()) if many.any() else 0.0,
        "bags": int(len(picks)),
    }
    if picks and all(len(p) == 4 and p[3] > 0 for p in picks):
        out["cluster_coverage"] = float(np.mean([p[2] / p[3] for p in picks]))
    return out
