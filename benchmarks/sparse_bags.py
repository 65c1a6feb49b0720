"""MIL models on large bags whose label rests on a few instances: fashion-sparse.

    python benchmarks/sparse_bags.py --work /tmp/sparseb                      # every model below
    python benchmarks/sparse_bags.py --work /tmp/sparseb --models abmil mhim-abmil --seeds 0 1

fashion-sparse (micromil_core/data/datasets.py): 40-80 real Fashion-MNIST images per bag; a
positive bag holds 1-4 dresses, a negative one none, so 1-10 % of a positive bag carries the
label, as with small metastases in a slide. This is the regime MHIM-MIL's hard-instance
masking was designed for, unlike MUSK/UCSB bags of 5-65 instances.

One site with train/val/test splits (test bags from the t10k images only). Each model trains
with its configs/cv/<name>.yaml (the settings of the cross-validation table, not tuned here)
plus `data.encoder: histo-texture`, is selected on the validation split, and is scored once
on the TEST split. Pairs BASE:OTHER are compared by training seed (same data, same test
bags): the mean difference, its standard error and a paired t-test over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import (  # noqa: E402
    HERE,
    ROOT,
    check_pairs,
    model_config_args,
    paired_by_seed,
    spread,
    write_results,
)

from micromil_core.data.datasets import prepare_dataset  # noqa: E402
from micromil_core.data.site import load_site  # noqa: E402

ENCODER = "histo-texture"
KEYS = ("auc", "accuracy", "balanced_accuracy")


def train_one(model: str, seed: int, site: Path, work: Path, threads: int, overrides: list[str]) -> dict:
    """`micromil train` in its own process (a crash or leak stays there); reuses a finished run."""
    out = work / "runs" / f"{model}-seed{seed}"
    if not (out / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "micromil_core.cli", "train", "--data", str(site), "--out", str(out),
               "--seed", str(seed), "--set", f"data.encoder={ENCODER}", "--set", f"train.num_threads={threads}",
               *model_config_args(model)]
        for override in overrides:
            cmd += ["--set", override]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"model": model, "seed": seed, "error": proc.stderr.strip()[-500:]}
        (out / "bench-seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = json.loads((out / "bench-seconds.json").read_text())["seconds"]
    return {"model": model, "seed": seed, "best_epoch": metrics.get("best_epoch"),
            "test": metrics["test"], "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["abmil", "mhim-abmil", "micromil", "mhim-micromil"])
    ap.add_argument("--compare", nargs="*", default=["abmil:mhim-abmil", "micromil:mhim-micromil"],
                    metavar="BASE:OTHER", help="paired comparisons (both in --models)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    ap.add_argument("--max-bags", type=int, default=500, help="fashion-sparse bags in all")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the bags and splits")
    ap.add_argument("--jobs", type=int, default=2, help="parallel training runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config override for every run, e.g. train.weight_decay=1e-6")
    ap.add_argument("--work", default=str(ROOT / "runs" / "sparse-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "sparse_bags"))
    args = ap.parse_args()
    check_pairs(ap, args.compare, args.models)
    work = Path(args.work)
    data = work / "data"
    if not (data / "sites.yaml").is_file():
        prepare_dataset("fashion-sparse", data, max_bags=args.max_bags, seed=args.data_seed)
    site = data / "site-0"
    # Extract once, before the parallel runs, so they share one feature cache.
    subprocess.run([sys.executable, "-m", "micromil_core.cli", "extract", "--data", str(site),
                    "--encoder", ENCODER], check=True, capture_output=True)
    jobs = [(m, s) for s in args.seeds for m in args.models]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: train_one(*job, site, work, args.threads, args.overrides), jobs))
    command = f"python benchmarks/sparse_bags.py {' '.join(sys.argv[1:])}".rstrip()
    splits = [p.split for p in load_site(site).patients]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    lines = [
        "# MIL models on large sparse bags (fashion-sparse)",
        "",
        f"Command: `{command}`",
        "",
        f"fashion-sparse: {args.max_bags} bags (data seed {args.data_seed}) of 40-80 real "
        "Fashion-MNIST images; positive bags hold 1-4 dresses (witness rate 1-10 %), negative "
        f"bags none. One site, train/val/test = {counts['train']}/{counts['val']}/{counts['test']} "
        f"bags (test bags from the t10k images only). Features: {ENCODER}. Each model uses "
        f"configs/cv/<model>.yaml with {' '.join(args.overrides) or 'no override'}, is selected on the validation split, and is scored "
        f"on the TEST split; mean ± std over training seeds {','.join(map(str, args.seeds))}.",
        "",
        "| model | test AUC | accuracy | balanced accuracy | best epoch | wall s per run |",
        "|---|---|---|---|---|---|",
    ]
    for m in args.models:
        ok = [r for r in rows if r["model"] == m and "error" not in r]
        if not ok:
            lines.append(f"| {m} | failed: {next(r['error'] for r in rows if r['model'] == m)[-120:]} | | | | |")
            continue
        cells = [spread([r["test"][k] for r in ok]) for k in KEYS]
        lines.append(f"| {m} | {' | '.join(cells)} | {spread([r['best_epoch'] for r in ok])} | "
                     f"{spread([r['seconds'] for r in ok])} |")
    if args.compare:
        lines += ["", "Paired by training seed (same bags, same test split):", "",
                  *paired_by_seed(rows, args.compare, KEYS, lambda r, k: r["test"][k])]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
