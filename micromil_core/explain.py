"""Per-patient explanations a pathologist can check, written to the site's own disk.

For MicroMIL: the K representative images the model selected (one per cluster) and the
similarity graph between them. For attention models: the top-attention instances. Where
the instance images are known (features extracted here from images/, or a features file
whose instance count matches the patient's image folder) the images are shown, a tile as
its crop (:mod:`micromil_core.explain_instances`); otherwise
the instance indices and their scores are. With ``heatmaps``, where instances carry slide
coordinates, their scores are also drawn on the slides (:mod:`micromil_core.explain_heatmap`).

The gallery is ``index.html`` plus one PNG per patient: no scripts, nothing fetched, so it
opens offline on the site's own machine. Each patient's text (diagnosis, prediction) is
HTML beside the picture rather than drawn into it, so it wraps with the window instead of
running over the tiles.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from micromil_core.data.bag import Bag, collate_bags
from micromil_core.data.layout import IMAGES_DIR
from micromil_core.explain_heatmap import heatmap_section
from micromil_core.explain_instances import InstanceImage, instance_images
from micromil_core.io import atomic_path, write_text_atomic
from micromil_core.models.base import MILModel
from micromil_core.progress import progress
from micromil_core.training.mechanism import bag_picks
from micromil_core.training.metrics import decide
from micromil_core.training.recalibration import apply_calibration

if TYPE_CHECKING:
    from micromil_core.training.checkpoint import Checkpoint
    from micromil_core.training.loading import SiteBags

log = logging.getLogger(__name__)

TOP_INSTANCES = 12  # shown for attention models
DPI = 100
MIN_HEIGHT_IN = 2.8  # every picture at least 280 px high: readable without zooming
MAX_TILES_IN = 6.0  # the tile grid's width, so a page 800 px wide shows it unscaled
CMAP = "viridis"


def _explained_instances(model: MILModel, bag: Bag, device: torch.device):
    """(probs (C,), shown indices, adjacency or None, scores of shown instances, scores of
    all N instances or None)."""
    batch = collate_bags([bag]).to(device)
    model.eval()
    pred = model.predict_batch(batch)
    probs = pred.probs[0].float().cpu().numpy()
    every = pred.instance_scores
    every = None if every is None else every[0, : bag.num_instances].float().cpu().numpy()
    if pred.selected is not None:
        idx = pred.selected[0].cpu().numpy()
        real = idx >= 0  # -1: a cluster without a node (bag smaller than K)
        idx = idx[real]
        adj = pred.adjacency[0].float().cpu().numpy() if pred.adjacency is not None else None
        adj = adj[np.ix_(real, real)] if adj is not None else None
        scores = every[idx] if every is not None else np.ones(len(idx))
        return probs, idx, adj, scores, every
    if every is not None:
        idx = np.argsort(-every)[:TOP_INSTANCES]
        return probs, idx, None, every[idx], every
    return probs, np.array([], dtype=int), None, np.array([]), None


@dataclass(frozen=True)
class Shown:
    """What one patient's picture shows; ``idx`` and ``scores`` are (M,), ``adj`` (M, M)."""

    idx: np.ndarray
    scores: np.ndarray
    adj: np.ndarray | None
    images: list[InstanceImage] | None  # of every instance of the bag (tiles cropped)
    score_label: str  # what the scores (and the colours) are

    @property
    def has_images(self) -> bool:
        return self.images is not None and len(self.idx) > 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _norm(scores: np.ndarray):
    """One colour scale per patient, from its lowest to its highest shown score."""
    from matplotlib.colors import Normalize

    low, high = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    if high - low < 1e-6:  # all equal: still a readable bar around the one value
        low, high = low - 0.01, high + 0.01
    return Normalize(low, high)


def _tiles(fig, shown: Shown, norm) -> list:
    """The instance images in a grid, framed in their score's colour; returns the axes."""
    cmap = _pyplot().get_cmap(CMAP)
    k = len(shown.idx)
    cols = int(math.ceil(math.sqrt(k)))
    rows = int(math.ceil(k / cols))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for j, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= k:
            ax.set_visible(False)
            continue
        inst, score = int(shown.idx[j]), float(shown.scores[j])
        ax.imshow(shown.images[inst].read())  # type: ignore[index]
        for spine in ax.spines.values():
            spine.set(edgecolor=cmap(norm(score)), linewidth=3)
        ax.set_title(f"{j}: instance #{inst}\nscore {score:.2f}", fontsize=8)
    return [ax for ax in axes[:k]]


def _graph_side(m: int) -> float:
    """The graph panel's side in inches: larger for more nodes, so their labels fit."""
    return float(np.clip(0.19 * m, 3.6, 6.5))


def _graph(ax, shown: Shown, norm) -> None:
    """The similarity graph on a circle; nodes numbered as their tiles (or by instance
    index when there are no tiles) and coloured by score."""
    cmap = _pyplot().get_cmap(CMAP)
    m = len(shown.idx)
    # Nodes as wide as 80 % of their spacing on the circle (the axes span 2.6 units over
    # about 85 % of the panel), at most a third of an inch.
    gap = 2 * np.pi / max(m, 1) * 0.85 * _graph_side(m) / 2.6
    diameter = min(0.8 * gap, 0.34)
    angle = np.pi / 2 - np.linspace(0, 2 * np.pi, m, endpoint=False)  # clockwise from the top
    xy = np.stack([np.cos(angle), np.sin(angle)], 1)  # (M, 2)
    for a, b in zip(*np.nonzero(np.triu(shown.adj, 1)), strict=True):
        ax.plot(xy[[a, b], 0], xy[[a, b], 1], c="grey", lw=1, alpha=0.7, zorder=1)
    ax.scatter(
        xy[:, 0],
        xy[:, 1],
        c=shown.scores,
        cmap=CMAP,
        norm=norm,
        s=(diameter * 72) ** 2,
        edgecolors="black",
        linewidths=0.6,
        zorder=2,
    )
    for j, (x, y) in enumerate(xy):
        label = str(j) if shown.has_images else f"#{int(shown.idx[j])}"
        # Dark text on the light (high-score) end of viridis, white on the dark end.
        light = sum(cmap(norm(float(shown.scores[j])))[:3]) > 1.5
        ax.text(
            x,
            y,
            label,
            fontsize=8 if m <= 16 else 7,
            ha="center",
            va="center",
            zorder=3,
            color="black" if light else "white",
        )
    ax.set_title("similarity graph (lines: linked as similar)", fontsize=9)
    ax.set(xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal")
    ax.axis("off")


def _bars(ax, shown: Shown, norm) -> None:
    """Without images or a graph: the shown instances' scores as bars, highest on top."""
    cmap = _pyplot().get_cmap(CMAP)
    labels = [f"#{int(i)}" for i in shown.idx]
    ax.barh(labels, shown.scores, color=[cmap(norm(float(s))) for s in shown.scores])
    ax.invert_yaxis()
    ax.set(xlabel=shown.score_label, ylabel="instance", title="highest-scoring instances")


def _draw(path: Path, title: str, shown: Shown) -> tuple[int, int]:
    """Write the patient's PNG; returns its size in pixels (width, height)."""
    plt = _pyplot()
    norm = _norm(shown.scores)
    graph = shown.adj is not None and len(shown.idx) > 0
    if shown.has_images:
        cols = int(math.ceil(math.sqrt(len(shown.idx))))
        rows = int(math.ceil(len(shown.idx) / cols))
        tile = min(1.8, MAX_TILES_IN / cols)
        side = _graph_side(len(shown.idx)) if graph else 0.0
        size = (cols * tile + (side + 1.0 if graph else 0.9), rows * (tile + 0.45) + 0.5)
        size = (size[0], max(size[1], side + 0.4))
    elif graph:
        side = _graph_side(len(shown.idx))
        size = (side + 1.0, side + 0.4)
    else:
        size = (5.0, 0.3 * max(len(shown.idx), 1) + 1.2)
    size = (size[0], max(size[1], MIN_HEIGHT_IN))
    # Constrained layout keeps every title and label clear of the tiles at any grid size.
    fig = plt.figure(figsize=size, layout="constrained")
    fig.suptitle(title, fontsize=10)
    colour_axes: list = []
    if shown.has_images:
        left, right = (
            fig.subfigures(1, 2, width_ratios=[cols * tile, side + 1.0]) if graph else (fig, None)
        )
        colour_axes = _tiles(left, shown, norm)
        if right is not None:
            ax = right.subplots()
            _graph(ax, shown, norm)
            colour_axes = [ax]
    elif graph:
        ax = fig.subplots()
        _graph(ax, shown, norm)
        colour_axes = [ax]
    elif len(shown.idx):
        _bars(fig.subplots(), shown, norm)
    else:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "this model gives no instance scores", ha="center", va="center")
    if colour_axes:  # the legend of the node and frame colours
        from matplotlib.cm import ScalarMappable

        bar = fig.colorbar(
            ScalarMappable(norm=norm, cmap=CMAP), ax=colour_axes, shrink=0.8, aspect=25
        )
        bar.set_label(shown.score_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return int(round(size[0] * DPI)), int(round(size[1] * DPI))


@dataclass(frozen=True)
class PatientEntry:
    """One patient's row of the gallery."""

    patient_id: str
    true: str
    predicted: str
    confidence: float
    distinct: str | None  # MicroMIL: distinct representatives of min(N, K)
    png: str
    size: tuple[int, int]  # the PNG's pixels (width, height)
    shown: Shown
    heatmap: str = ""  # HTML of the heatmaps or of why there are none (--heatmaps)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 1.5em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin: 0 0 .3em; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.wide { overflow-x: auto; }
.legend { background: #f5f7fa; border: 1px solid #d5dde6; padding: .4em 1em; }
.legend dt { font-weight: bold; } .legend dd { margin: 0 0 .5em 1em; }
.patient { border-top: 2px solid #d5dde6; margin-top: 1.5em; padding-top: .8em; }
.patient img { display: block; max-width: 100%; height: auto; border: 1px solid #ddd; }
.scores { display: flex; flex-wrap: wrap; gap: .2em 1.2em; padding-left: 1em;
          font-variant-numeric: tabular-nums; }
.scores li { min-width: 7.5em; }
.note { background: #fff8e1; border-left: 4px solid #e0b000; padding: .4em .8em; }
"""

FEATURES_ONLY = "This site has features only: no images to show; instance scores are listed."


def _legend(graph: bool, any_images: bool) -> str:
    """What the pictures' parts and colours mean, for the kind of model shown."""
    what = (
        "representatives the model selected, one per cluster"
        if graph
        else (f"instances with the highest attention (up to {TOP_INSTANCES})")
    )
    score = (
        "selection score: the instance's highest probability of being drawn by any cluster"
        if graph
        else "attention weight: the instance's share of the bag's pooled representation"
    )
    values = (
        "the colour bar beside each picture gives the values"
        if graph or any_images
        else "the bars' length gives the values"
    )
    items = [
        (
            "Tiles" if any_images else "Instances",
            f"the {what}; #i is the instance's position in the patient's bag.",
        ),
        (
            "Colours",
            f"the {score}. Dark purple is the patient's lowest shown score, yellow "
            f"its highest; {values}.",
        ),
    ]
    if graph:
        node = "numbered as its tile" if any_images else "labelled #i"
        items.append(
            (
                "Graph",
                f"one node per representative ({node}); a grey line joins two "
                "representatives the model links as similar (cosine similarity of their "
                "features).",
            )
        )
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    return f'<section class="legend"><h2>How to read the pictures</h2><dl>{body}</dl></section>'


def _summary_table(entries: list[PatientEntry], distinct_column: bool) -> str:
    head = ["patient", "true", "predicted", "confidence"]
    head += ["distinct representatives / min(N, K)"] if distinct_column else []
    rows = []
    for n, e in enumerate(entries):
        cells = [
            f'<td><a href="#patient-{n}">{html.escape(e.patient_id)}</a></td>',
            f"<td>{html.escape(e.true)}</td>",
            f"<td>{html.escape(e.predicted)}</td>",
            f'<td class="num">{e.confidence:.3f}</td>',
        ]
        if distinct_column:
            cells.append(f"<td>{html.escape(e.distinct or '')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<div class="wide"><table><tr>{header}</tr>{"".join(rows)}</table></div>'


def _patient_card(n: int, e: PatientEntry, note: str) -> str:
    """The patient's heading and facts as text, the picture (a link to the PNG), and,
    without images, the instance scores as a table."""
    facts = f"true {e.true}, predicted {e.predicted}, confidence {e.confidence:.3f}"
    if e.distinct is not None:
        facts += f"; distinct representatives: {e.distinct}"
    name, (w, h) = html.escape(e.png), e.size
    parts = [
        f'<section class="patient" id="patient-{n}">',
        f"<h2>patient {html.escape(e.patient_id)}</h2><p>{html.escape(facts)}</p>",
        f'<a href="{name}" title="open the full-size picture"><img src="{name}" width="{w}" '
        f'height="{h}" alt="explanation of patient {html.escape(e.patient_id)}"></a>',
    ]
    if not e.shown.has_images:
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        # Highest first, wrapped into as many columns as the window has room for.
        order = np.argsort(-e.shown.scores, kind="stable")
        items = "".join(
            f"<li>#{int(e.shown.idx[i])}: {float(e.shown.scores[i]):.4f}</li>" for i in order
        )
        label = html.escape(e.shown.score_label)
        parts.append(f'<p>Instances by {label}:</p><ul class="scores">{items}</ul>')
    parts += [e.heatmap, "</section>"]
    return "\n".join(parts)


def _page(model_name: str, site_name: str, entries: list[PatientEntry]) -> str:
    any_images = any(e.shown.has_images for e in entries)
    graph = any(e.shown.adj is not None for e in entries)
    distinct_column = any(e.distinct is not None for e in entries)
    # Said once for a site without images; per patient where only some lack them.
    note = (
        ""
        if not any_images
        else ("No images were found for this patient's instances; instance scores are listed.")
    )
    heading = f"{model_name} explanations: {site_name}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(heading)}</title><style>{CSS}</style></head><body>",
            f"<h1>{html.escape(heading)}</h1>",
            "<p>Per patient: the instances the model based its prediction on, with their scores. "
            "These files stay on this site. Click a picture to open it at full size.</p>",
            ""
            if any_images or not entries
            else f'<p class="note">{html.escape(FEATURES_ONLY)}</p>',
            _legend(graph, any_images) if entries else "<p>No patients to explain.</p>",
            _summary_table(entries, distinct_column) if entries else "",
            *(_patient_card(n, e, note) for n, e in enumerate(entries)),
            "</body></html>",
            "",
        ]
    )


def write_explanations(
    model: MILModel,
    ckpt: Checkpoint,
    site_bags: SiteBags,
    raw_bags: list[Bag],
    scaled_bags: list[Bag],
    device: torch.device,
    out: Path,
    threshold: float | None = None,
    show_progress: bool = False,
    heatmaps: bool = False,
) -> Path:
    """One PNG per patient plus an index.html; returns the index path (``show_progress``:
    a bar over patients, the CLI's: drawing a gallery takes about a second per patient).
    ``heatmaps``: also the instance scores on the slides' coordinates, see
    :mod:`micromil_core.explain_heatmap`.

    "predicted" follows the same decision as the predictions (``threshold``, see
    :func:`micromil_core.training.metrics.decide`).

    ``raw_bags`` (as read from disk) and ``scaled_bags`` (as the model sees them) are the
    same patients in the same order.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    patients = progress(zip(raw_bags, scaled_bags, strict=True), f"explaining {site_bags.site.name}",
                        "patient", show_progress, total=len(raw_bags))
    for raw, bag in patients:
        probs, idx, adj, scores, every = _explained_instances(model, bag, device)
        probs = apply_calibration(probs[None, :], ckpt.calibration)[0]
        images = instance_images(
            Path(site_bags.site.path), site_bags.feature_dir, raw.patient_id, raw.num_instances
        )
        pred = ckpt.classes[int(decide(probs[None, :], threshold)[0])]
        true = ckpt.classes[bag.label] if bag.label >= 0 else "unknown"
        distinct = None
        if adj is not None:  # MicroMIL: how many of its K picks are different instances
            d, room = bag_picks(idx.tolist(), raw.num_instances)
            distinct = f"{d} of {room} ({d / room:.2f})" if room else "n/a"
        label = "selection score" if adj is not None else "attention weight"
        shown = Shown(idx, scores, adj, images, label)
        png = out / f"{raw.patient_id}.png"
        size = _draw(
            png,
            f"patient {raw.patient_id}: true {true}, predicted {pred} (p={probs.max():.2f})",
            shown,
        )
        heat = heatmap_section(
            out, raw.patient_id, raw.slides, every, label,
            Path(site_bags.site.path) / IMAGES_DIR / raw.patient_id,
        ) if heatmaps else ""
        entries.append(
            PatientEntry(
                raw.patient_id, true, pred, float(probs.max()), distinct, png.name, size, shown,
                heat,
            )
        )
    index = out / "index.html"
    write_text_atomic(index, _page(ckpt.model_name, site_bags.site.name, entries))
    return index
