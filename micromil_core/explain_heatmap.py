"""Heatmaps of instance scores at the instances' positions on their slides (``--heatmaps``).

Where a patient's feature files carry instance coordinates (TRIDENT/CLAM ``.h5``: dataset
``coords`` (N, 2), the top-left corner of each patch in level-0 pixels), the explanation
gallery draws each slide's instance scores (attention weights, or MicroMIL's selection
scores) on a grid at those coordinates: one panel per slide, one colour scale per patient,
over a thumbnail of the slide where the slide is an image PIL reads (tiles of a capture in
``images/``). Without coordinates the gallery says why there is no heatmap.

Everything here stays on the site: it writes PNGs beside the gallery and reads the slide
index and coordinates that :class:`~micromil_core.data.bag.Slides` keeps at the site.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from micromil_core.data.bag import Slides
from micromil_core.data.layout import IMAGE_EXTENSIONS
from micromil_core.errors import ConfigError, ImageError
from micromil_core.io import atomic_path

HEATMAP_DIR = "heatmaps"  # beside index.html: explain/<site>/heatmaps/<patient_id>.png
MAX_CELLS = 300  # cells along a grid side; finer coordinates are binned into this many
PANEL_IN = 3.4  # a panel's longer side, inches
DPI = 100
CMAP = "viridis"
EMPTY = "#e6e6e6"  # cells without an instance
THUMB_PX = 512  # a thumbnail's longer side
THUMB_MAX_BYTES = 64 * 2**20  # larger files are whole slides: no thumbnail from PIL
OVER_THUMB_ALPHA = 0.6  # the heatmap's opacity over a thumbnail

Thumb = tuple[np.ndarray, tuple[int, int]]  # (h, w, 3) pixels, full (width, height)

NO_COORDS = (
    "No heatmap: this patient's instances carry no positions on a slide. Heatmaps need "
    "instance coordinates in the feature files: the 'coords' (N, 2) dataset of TRIDENT/CLAM "
    ".h5 files, or a 'coords' entry in a .pt dict; features extracted from images have none."
)
NO_SCORES = "No heatmap: this model gives no instance scores."


def _step(values: np.ndarray) -> float:
    """The grid spacing along one axis: the smallest gap between distinct positions
    (the patch stride of a regular tiling); 0 when there is a single position."""
    unique = np.unique(values)
    return float(np.diff(unique).min()) if len(unique) > 1 else 0.0


def coordinate_grid(
    coords: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Values placed on a regular grid at their coordinates.

    Each instance fills the cell of its (x, y); cells without one are NaN; where several
    instances share a cell (binned coordinates) the highest value is shown. The spacing
    is the coordinates' own (see :func:`_step`), coarsened so that a side has at most
    ``MAX_CELLS`` cells.

    Shapes:
        coords: (n, 2) (x, y); values: (n,)
        return: grid (rows, cols) float, NaN where empty; extent (left, right, bottom,
            top) in coordinate units for ``imshow(origin="upper")`` (y grows downwards,
            as on a slide)
    """
    xy = np.asarray(coords, dtype=np.float64)
    low = xy.min(axis=0)  # (2,)
    span = xy.max(axis=0) - low  # (2,)
    steps = np.array([_step(xy[:, 0]), _step(xy[:, 1])])
    fallback = steps.max() if steps.max() > 0 else 1.0
    steps = np.where(steps > 0, steps, fallback)
    steps = np.maximum(steps, span / (MAX_CELLS - 1))  # at most MAX_CELLS per side
    cell = np.rint((xy - low) / steps).astype(np.int64)  # (n, 2): column, row
    cols, rows = int(cell[:, 0].max()) + 1, int(cell[:, 1].max()) + 1
    grid = np.full((rows, cols), -np.inf)
    np.maximum.at(grid, (cell[:, 1], cell[:, 0]), np.asarray(values, dtype=np.float64))
    grid[np.isneginf(grid)] = np.nan
    # A cell spans [x, x + step): TRIDENT/CLAM coordinates are a patch's top-left corner.
    left, top = low
    return grid, (left, left + cols * steps[0], top + rows * steps[1], top)


def slides_with_coords(slides: Slides | None) -> list[int]:
    """Indices of the slides whose every instance has a position."""
    if slides is None or slides.coords is None:
        return []
    return [s for s in range(len(slides.names)) if slides.has_coords(s)]


def thumbnail(path: Path) -> Thumb | None:
    """A small copy of a slide image and the image's full size; None when it is not an
    image file PIL reads at a modest size (whole-slide files need a slide reader)."""
    from PIL import Image

    from micromil_core.encoders.wsi import is_slide_file, slide_thumbnail

    if path.is_file() and is_slide_file(path):  # .svs, pyramidal .tif: the slide reader
        try:
            return slide_thumbnail(path, THUMB_PX)
        except (ImageError, ConfigError):  # unreadable, or no slide reader installed
            return None
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
        return None
    if path.stat().st_size > THUMB_MAX_BYTES:
        return None
    try:
        with Image.open(path) as im:
            full = im.size
            im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a reduced size
            small = im.convert("RGB")
            small.thumbnail((THUMB_PX, THUMB_PX))
            return np.asarray(small), full
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def draw_heatmaps(
    path: Path,
    title: str,
    slides: Slides,
    scores: np.ndarray,
    score_label: str,
    thumbnails: dict[int, Thumb] | None = None,
) -> tuple[int, int]:
    """One panel per slide with coordinates, sharing one colour scale, over the slide's
    thumbnail where ``thumbnails`` (by slide index) has one; returns the PNG's size in
    pixels (width, height).

    Shapes: scores (N,), the bag's instances in bag order
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    panels = slides_with_coords(slides)
    coords = slides.coords.numpy()  # type: ignore[union-attr]  # (N, 2); panels imply coords
    shown = np.concatenate([scores[slides.rows(s).numpy()] for s in panels])
    low, high = float(shown.min()), float(shown.max())
    if high - low < 1e-6:  # all equal: a readable bar around the one value
        low, high = low - 0.01, high + 0.01
    norm = Normalize(low, high)
    cmap = plt.get_cmap(CMAP).with_extremes(bad=EMPTY)
    grids = []
    for s in panels:
        rows = slides.rows(s).numpy()
        grids.append(coordinate_grid(coords[rows], scores[rows]))
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    # Each panel keeps its slide's aspect ratio within a PANEL_IN square.
    aspect = max(g.shape[0] / max(g.shape[1], 1) for g, _ in grids)
    panel_h = PANEL_IN * float(np.clip(aspect, 0.35, 1.0))
    size = (ncols * PANEL_IN + 1.0, nrows * (panel_h + 0.6) + 0.5)
    fig = plt.figure(figsize=size, layout="constrained")
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, s, (grid, extent) in zip(axes, panels, grids, strict=False):
        thumb = (thumbnails or {}).get(s)
        if thumb is None:
            ax.imshow(grid, cmap=cmap, norm=norm, extent=extent, origin="upper",
                      interpolation="nearest")
        else:
            _over_thumbnail(ax, grid, extent, thumb, cmap.with_extremes(bad=(0, 0, 0, 0)), norm)
        ax.set_title(f"{slides.names[s]} ({len(slides.rows(s))} instances)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_aspect("equal")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=CMAP), ax=list(axes[: len(panels)]),
                       shrink=0.8, aspect=25)
    bar.set_label(score_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return int(round(size[0] * DPI)), int(round(size[1] * DPI))


def _over_thumbnail(ax, grid: np.ndarray, extent, thumb: Thumb, cmap, norm) -> None:
    """The heatmap, partly transparent, over the slide's thumbnail in slide coordinates."""
    pixels, (width, height) = thumb
    ax.imshow(pixels, extent=(0, width, height, 0), origin="upper")
    ax.imshow(grid, cmap=cmap, norm=norm, extent=extent, origin="upper",
              interpolation="nearest", alpha=OVER_THUMB_ALPHA)
    ax.set_xlim(min(0, extent[0]), max(width, extent[1]))
    ax.set_ylim(max(height, extent[2]), min(0, extent[3]))


def heatmap_section(
    out: Path,
    patient_id: str,
    slides: Slides | None,
    scores: np.ndarray | None,
    score_label: str,
    image_dir: Path | None = None,
) -> str:
    """The HTML of one patient's heatmaps (drawn to ``out/heatmaps/<patient_id>.png``), or
    a note saying why there are none. ``image_dir``: the patient's ``images/<patient_id>/``,
    where slides named by an image path (tiled captures) get their thumbnail underneath.

    Shapes: scores (N,) every instance's score in bag order, or None
    """
    if scores is None:
        return f'<p class="note">{html.escape(NO_SCORES)}</p>'
    panels = slides_with_coords(slides)
    if slides is None or not panels:
        return f'<p class="note">{html.escape(NO_COORDS)}</p>'
    png = Path(out) / HEATMAP_DIR / f"{patient_id}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    thumbs = {}
    if image_dir is not None:
        for s in panels:
            found = thumbnail(image_dir / slides.names[s])
            if found is not None:
                thumbs[s] = found
    w, h = draw_heatmaps(png, f"patient {patient_id}: {score_label} on the slide", slides,
                         scores, score_label, thumbs)
    src = html.escape(f"{HEATMAP_DIR}/{png.name}")
    parts = [
        f"<h3>Heatmap: {html.escape(score_label)} on the slide</h3>",
        "<p>One panel per slide; each cell is one instance at its position on the slide "
        "(axes in the slide's coordinates, usually level-0 pixels), coloured by its "
        f"{html.escape(score_label)} on the colour bar's scale; "
        + ("the slide image shows through the cells, bare where there is no instance.</p>"
           if thumbs else "grey: no instance there.</p>"),
        f'<a href="{src}" title="open the full-size heatmap"><img src="{src}" width="{w}" '
        f'height="{h}" alt="heatmap of patient {html.escape(patient_id)}"></a>',
    ]
    missing = [slides.names[s] for s in range(len(slides.names)) if s not in panels]
    if missing:
        parts.append(
            f'<p class="note">No heatmap for {html.escape(", ".join(missing))}: the feature '
            "file of that slide holds no instance coordinates ('coords').</p>"
        )
    return "\n".join(parts)
