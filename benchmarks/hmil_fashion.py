"""HMIL on a real hierarchical task: fashion-hier (Fashion-MNIST bags, top/footwear coarse
labels, 7 garment classes as fine labels), against two gated-ABMIL baselines.

    python benchmarks/hmil_fashion.py --work /tmp/hmilb                # ~5 CPU-min, 1 thread
    python benchmarks/hmil_fashion.py --work /tmp/hmilb --seeds 0 --max-bags 600

One pooled site with train/val/test splits (test bags from the t10k images only). Every
model trains with the settings of configs/hmil-fashion.yaml (only the model differs) and is
selected on the validation split; the figures are on the TEST split, reported only.

* ``hmil``: coarse and fine predictions from one model (fine_to_coarse derived from the
  training patients);
* ``gated-abmil`` (coarse): the coarse-only baseline, trained on the coarse label;
* ``gated-abmil`` (flat fine): the flat baseline for the fine task, trained on the fine
  label as a 7-class label (a site sharing the same cached features).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import HERE, ROOT, spread, write_results  # noqa: E402

from micromil_core.config import load_config  # noqa: E402
from micromil_core.data.datasets import prepare_dataset  # noqa: E402
from micromil_core.data.site import load_site  # noqa: E402
from micromil_core.training.fitting import train_pooled  # noqa: E402
from micromil_core.training.loading import feature_dir_for  # noqa: E402

CONFIG = ROOT / "configs" / "hmil-fashion.yaml"
COARSE_KEYS = ("accuracy", "balanced_accuracy", "auc")
FINE_KEYS = ("fine_accuracy", "fine_balanced_accuracy", "fine_macro_f1", "fine_auc")


def prepared(work: Path, max_bags: int, seed: int) -> Path:
    """The fashion-hier site folder under ``work``, prepared once."""
    data = work / "data"
    if not (data / "sites.yaml").is_file():
        prepare_dataset("fashion-hier", data, max_bags=max_bags, seed=seed)
    return data / "site-0"


def flat_site(site: Path, feature_dir: Path, out: Path) -> Path:
    """A copy of ``site`` whose label is the fine label, reading the cached features."""
    out.mkdir(parents=True, exist_ok=True)
    with open(site / "patients.csv", newline="") as fh:
        rows = [[r["patient_id"], r["fine_label"], r["split"]] for r in csv.DictReader(fh)]
    with open(out / "patients.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["patient_id", "label", "split"], *rows])
    link = out / "features"
    if not link.exists():
        link.symlink_to(feature_dir.resolve(), target_is_directory=True)
    return out


def run(arm: str, model: str, site: Path, cfg, seed: int, work: Path) -> dict:
    cfg = replace(cfg, model=replace(cfg.model, name=model), train=replace(cfg.train, seed=seed))
    start = time.process_time()
    metrics = train_pooled([site], cfg, work / f"{arm}-seed{seed}")
    test = metrics["test"]
    if arm == "flat-fine":  # the fine label IS this model's label
        test = {f"fine_{k}": test[k] for k in ("accuracy", "balanced_accuracy", "auc")} | {
            "fine_macro_f1": test["f1"]  # macro F1 for a multi-class label
        }
    return {
        "arm": arm,
        "model": model,
        "seed": seed,
        "best_epoch": metrics["best_epoch"],
        "cpu_seconds": time.process_time() - start,
        "test": test,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--max-bags", type=int, default=1200, help="fashion-hier bags in all")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the bags and splits")
    ap.add_argument("--work", default=str(ROOT / "runs" / "hmil-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "hmil_fashion"))
    args = ap.parse_args()
    work = Path(args.work)
    cfg = load_config(CONFIG)
    torch.set_num_threads(cfg.train.num_threads or 1)
    site = prepared(work, args.max_bags, args.data_seed)
    ids = load_site(site).patient_ids
    start = time.process_time()
    features = feature_dir_for(site, ids, cfg.data, torch.device("cpu"))
    extract_cpu = time.process_time() - start
    flat = flat_site(site, features, work / "flat" / "site-0")
    flat_cfg = replace(cfg, data=replace(cfg.data, encoder=None))
    command = f"python benchmarks/hmil_fashion.py {' '.join(sys.argv[1:])}".rstrip()
    rows = []
    for seed in args.seeds:
        rows.append(run("hmil", "hmil", site, cfg, seed, work))
        rows.append(run("coarse", "gated-abmil", site, cfg, seed, work))
        rows.append(run("flat-fine", "gated-abmil", flat, flat_cfg, seed, work))
    for r in rows:
        r["command"] = command

    split = {s: 0 for s in ("train", "val", "test")}
    for rec in load_site(site).patients:
        split[rec.split] += 1

    def cell(arm: str, key: str) -> str:
        values = [r["test"][key] for r in rows if r["arm"] == arm and key in r["test"]]
        return spread(values) if values else "–"

    labels = {
        "hmil": "HMIL (one model, both levels)",
        "coarse": "gated ABMIL, coarse label only",
        "flat-fine": "gated ABMIL, flat 7-class fine label",
    }
    lines = [
        "# HMIL on a real hierarchical task (fashion-hier)",
        "",
        f"Command: `{command}`",
        "",
        f"fashion-hier: {args.max_bags} bags of real Fashion-MNIST images (data seed "
        f"{args.data_seed}); one pooled site, train/val/test = {split['train']}/{split['val']}/"
        f"{split['test']} bags (test bags from the t10k images only). A bag holds 1-3 images "
        "of its finding (fine label: coat, pullover, shirt, tshirt -> coarse 'top'; "
        "ankle-boot, sandal, sneaker -> coarse 'footwear') and 3-6 background images "
        "(trouser, dress, bag). Features: histo-texture (171-d, handcrafted).",
        "",
        f"Settings of `configs/hmil-fashion.yaml` for every model (only the model differs); "
        "selection on the validation split (coarse loss for HMIL and the coarse baseline, "
        "fine loss for the flat baseline); figures on the TEST split, mean ± std over "
        f"training seeds {','.join(map(str, args.seeds))}. Fine AUC: macro one-vs-rest.",
        "",
        "| model | coarse acc | coarse bal. acc | coarse AUC | fine acc | fine bal. acc | "
        "fine macro-F1 | fine AUC | best epoch | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, label in labels.items():
        rs = [r for r in rows if r["arm"] == arm]
        lines.append(
            f"| {label} | "
            + " | ".join(cell(arm, k) for k in (*COARSE_KEYS, *FINE_KEYS))
            + f" | {spread([r['best_epoch'] for r in rs])} | "
            f"{spread([r['cpu_seconds'] for r in rs])} |"
        )
    lines += [
        "",
        f"Feature extraction in this invocation: {extract_cpu:.0f} CPU s (0 when --work "
        "already held the cache; features are extracted once and reused by every run).",
        "",
        "History: the first run of this script used HMIL with a shared fine scorer (one",
        "Linear(d', 1), as in the coarse branch) and gave, on the same test split, coarse acc",
        "0.942 ± 0.011, fine acc 0.670 ± 0.034, fine macro-F1 0.658 ± 0.039 (seeds 0,1,2).",
        "The per-class fine scorer now default was then chosen on the VALIDATION split (seed",
        "0: fine acc 0.717 -> 0.839; lr 1e-3 or 100 epochs did not help there), not on test.",
    ]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
