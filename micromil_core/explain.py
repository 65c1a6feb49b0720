"""Per-patient explanations a pathologist can check, written to the site's own disk.

For MicroMIL: the K representative images the model selected (one per cluster) and the
similarity graph between them. For attention models: the top-attention instances. Where
the instance images are known (features extracted here from images/, or a features file
whose instance count matches the patient's image folder) the images are shown; otherwise
the instance indices are.
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.layout import find_feature_file, list_patient_images
from micromil_core.io import atomic_path, write_text_atomic
from micromil_core.models.base import MILModel
from micromil_core.training.mechanism import bag_picks
from micromil_core.training.metrics import decide
from micromil_core.training.recalibration import apply_calibration

if TYPE_CHECKING:
    from micromil_core.training.checkpoint import Checkpoint
    from micromil_core.training.loading import SiteBags

log = logging.getLogger(__name__)

TOP_INSTANCES = 12  # shown for attention models


def instance_images(
    site_dir: Path, feature_dir: Path, patient_id: str, n: int
) -> list[Path] | None:
    """Image file of each of the patient's n instances, or None when unknown."""
    ff = find_feature_file(feature_dir, patient_id)
    if ff is not None and ff.suffix == ".pt":
        obj = torch.load(ff, map_location="cpu", weights_only=True)
        if (
            isinstance(obj, dict)
            and isinstance(obj.get("images"), list)
            and len(obj["images"]) == n
        ):
            paths = []
            for rel in obj["images"]:
                for base in (site_dir, site_dir / "images" / patient_id):
                    if (base / rel).is_file():
                        paths.append(base / rel)
                        break
                else:
                    return None
            return paths
    images = list_patient_images(site_dir, patient_id)
    return images if len(images) == n else None


def _explained_instances(model: MILModel, bag: Bag, device: torch.device):
    """(probs (C,), shown indices, adjacency or None, scores of shown instances)."""
    batch = collate_bags([bag]).to(device)
    model.eval()
    pred = model.predict_batch(batch)
    probs = pred.probs[0].float().cpu().numpy()
    if pred.selected is not None:
        idx = pred.selected[0].cpu().numpy()
        real = idx >= 0  # -1: a cluster without a node (bag smaller than K)
        idx = idx[real]
        adj = pred.adjacency[0].float().cpu().numpy() if pred.adjacency is not None else None
        adj = adj[np.ix_(real, real)] if adj is not None else None
        scores = (
            pred.instance_scores[0].float().cpu().numpy()[idx]
            if pred.instance_scores is not None
            else np.ones(len(idx))
        )
        return probs, idx, adj, scores
    if pred.instance_scores is not None:
        s = pred.instance_scores[0, : bag.num_instances].float().cpu().numpy()
        idx = np.argsort(-s)[:TOP_INSTANCES]
        return probs, idx, None, s[idx]
    return probs, np.array([], dtype=int), None, np.array([])


def _draw(path: Path, title: str, idx, adj, scores, images: list[Path] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from micromil_core.encoders.images import read_image

    k = max(len(idx), 1)
    cols = int(math.ceil(math.sqrt(k)))
    rows = int(math.ceil(k / cols))
    fig = plt.figure(figsize=(cols * 1.3 + (4.5 if adj is not None else 0), rows * 1.4 + 0.6))
    grid = fig.add_gridspec(rows, cols + (3 if adj is not None else 0))
    for j, inst in enumerate(idx):
        ax = fig.add_subplot(grid[j // cols, j % cols])
        ax.set_xticks([])
        ax.set_yticks([])
        if images is not None:
            ax.imshow(read_image(images[int(inst)]))
        else:
            ax.text(0.5, 0.5, f"#{int(inst)}", ha="center", va="center")
        ax.set_title(f"{j}: #{int(inst)}\n{scores[j]:.2f}", fontsize=6)
    if adj is not None:
        ax = fig.add_subplot(grid[:, cols:])
        angle = np.linspace(0, 2 * np.pi, len(idx), endpoint=False)
        xy = np.stack([np.cos(angle), np.sin(angle)], 1)
        for a, b in zip(*np.nonzero(np.triu(adj, 1)), strict=True):
            ax.plot(xy[[a, b], 0], xy[[a, b], 1], c="grey", lw=0.6, alpha=0.7)
        ax.scatter(xy[:, 0], xy[:, 1], c=scores, cmap="viridis", s=60, zorder=3)
        for j, (x, y) in enumerate(xy):
            ax.text(x * 1.12, y * 1.12, str(j), fontsize=6, ha="center", va="center")
        ax.set_title("similarity graph of the representatives", fontsize=8)
        ax.set_aspect("equal")
        ax.axis("off")
    # Anchored above the axes (the tight bounding box grows to fit), so a two-line title
    # never covers the panel titles.
    fig.suptitle(title, fontsize=9, y=1.0, va="bottom")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_explanations(
    model: MILModel,
    ckpt: Checkpoint,
    site_bags: SiteBags,
    raw_bags: list[Bag],
    scaled_bags: list[Bag],
    device: torch.device,
    out: Path,
    threshold: float | None = None,
) -> Path:
    """One PNG per patient plus an index.html; returns the index path.

    "predicted" follows the same decision as the predictions (``threshold``, see
    :func:`micromil_core.training.metrics.decide`).

    ``raw_bags`` (as read from disk) and ``scaled_bags`` (as the model sees them) are the
    same patients in the same order.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    distinct_column = False
    for raw, bag in zip(raw_bags, scaled_bags, strict=True):
        probs, idx, adj, scores = _explained_instances(model, bag, device)
        probs = apply_calibration(probs[None, :], ckpt.calibration)[0]
        images = instance_images(
            Path(site_bags.site.path), site_bags.feature_dir, raw.patient_id, raw.num_instances
        )
        pred = ckpt.classes[int(decide(probs[None, :], threshold)[0])]
        true = ckpt.classes[bag.label] if bag.label >= 0 else "unknown"
        title = f"patient {raw.patient_id}: true {true}, predicted {pred} (p={probs.max():.2f})"
        distinct = ""
        if adj is not None:  # MicroMIL: how many of its K picks are different instances
            d, room = bag_picks(idx.tolist(), raw.num_instances)
            distinct = f"{d} of {room} ({d / room:.2f})" if room else "n/a"
            title += f"\ndistinct representatives: {distinct}"
            distinct_column = True
        png = out / f"{raw.patient_id}.png"
        _draw(png, title, idx, adj, scores, images)
        rows.append(
            f"<tr><td>{html.escape(raw.patient_id)}</td><td>{html.escape(true)}</td>"
            f"<td>{html.escape(pred)}</td><td>{probs.max():.3f}</td>"
            + (f"<td>{html.escape(distinct)}</td>" if adj is not None else "")
            +
            f'<td><a href="{html.escape(png.name)}"><img src="{html.escape(png.name)}" height="120"></a></td></tr>'
        )
    index = out / "index.html"
    write_text_atomic(
        index,
        "<!doctype html><meta charset='utf-8'><title>MicroMIL explanations</title>"
        f"<h1>{html.escape(ckpt.model_name)} explanations: {html.escape(site_bags.site.name)}</h1>"
        "<p>Selected representative instances per patient (MicroMIL) or top-attention "
        "instances, with their scores. These files stay on this site.</p>"
        "<table border=1 cellpadding=4><tr><th>patient</th><th>true</th><th>predicted</th>"
        "<th>confidence</th>"
        + ("<th>distinct representatives / min(N, K)</th>" if distinct_column else "")
        + "<th>instances</th></tr>" + "".join(rows) + "</table>",
    )
    return index
