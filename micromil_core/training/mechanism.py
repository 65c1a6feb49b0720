"""Measures of whether a model's mechanism does what it claims, beside its final score.

MicroMIL picks one representative instance per cluster (K of them) and builds its graph
over those; if the K picks are copies of one or two instances, the graph is a graph of
copies and the GNN sees one instance. ``representative_diversity`` measures that per bag:
distinct representatives / min(N, K), 1.0 when every pick is a different instance (or
every instance of a bag smaller than K is picked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from micromil_core.data.bag import Bag, collate_bags

# (distinct representatives, min(N, K)) of one bag
Picks = tuple[int, int]


def bag_picks(selected: Sequence[int], n_instances: int) -> Picks:
    """(distinct instances among ``selected``, the most there could be: min(N, K)).

    An index of -1 is a cluster without a node (MicroMIL's "distinct" draw on a bag
    smaller than K); it is not an instance.
    """
    return len({int(i) for i in selected if int(i) >= 0}), min(n_instances, len(selected))


def representative_picks(model: Any, bags: Sequence[Bag], device: torch.device) -> list[Picks] | None:
    """``bag_picks`` of every bag, in ``bags`` order; None for a model that selects no
    representatives (every model but MicroMIL). One bag per forward pass, so no padded
    instance can be counted."""
    model.eval()
    picks = []
    for bag in bags:
        pred = model.predict_batch(collate_bags([bag]).to(device))
        if pred.selected is None:
            return None
        picks.append(bag_picks(pred.selected[0].tolist(), bag.num_instances))
    return picks


def representative_diversity(picks: Sequence[Picks]) -> dict[str, Any]:
    """{mean, median, single_fraction, bags} of distinct / min(N, K) over bags.

    ``single_fraction``: the share of bags with room for more than one pick whose
    representatives are all ONE instance (a graph of copies).
    """
    distinct = np.array([d for d, _ in picks], dtype=float)
    room = np.array([r for _, r in picks], dtype=float)
    ok = room > 0
    share = distinct[ok] / room[ok]
    many = room > 1
    return {
        "mean": float(share.mean()) if share.size else float("nan"),
        "median": float(np.median(share)) if share.size else float("nan"),
        "single_fraction": float(((distinct == 1) & many).sum() / many.sum()) if many.any() else 0.0,
        "bags": int(len(picks)),
    }
