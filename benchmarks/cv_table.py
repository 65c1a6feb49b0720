"""10-fold cross-validation table of MIL models on the classic real MIL benchmarks.

Same folds for every model (they depend only on the seed and the labels). Each fold carves
a stratified validation set from its training part for model selection and early
stopping; the test fold is used once, after selection. Literature values: Ilse et al. 2018,
Table 1 (attention MIL, 10-fold CV), as cited in shared/METHODS.md.

    python benchmarks/cv_table.py                                   # full table
    python benchmarks/cv_table.py --datasets musk1 --models micromil --folds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LITERATURE = {"musk1": 0.892, "musk2": 0.858}  # Ilse et al. 2018, Table 1 (accuracy)


def run_one(dataset: str, model: str, args: argparse.Namespace) -> dict:
    data = Path(args.work) / "data" / dataset
    out = Path(args.work) / "runs" / f"{dataset}-{model}"
    config = ROOT / "configs" / "cv" / f"{model}.yaml"
    cmd = [sys.executable, "-m", "micromil_core.cli", "cv", "--data", str(data / "site-0"),
           "--model", model, "--folds", str(args.folds), "--seed", str(args.seed),
           "--out", str(out), "--set", f"train.num_threads={args.threads}"]
    if config.is_file():
        cmd += ["--config", str(config)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"dataset": dataset, "model": model, "error": proc.stderr.strip()[-500:]}
    summary = json.loads((out / "metrics.json").read_text())
    summary.update(dataset=dataset, model=model, seconds=time.perf_counter() - start)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["musk1", "musk2", "ucsb-breast"])
    ap.add_argument("--models", nargs="+", default=["gated-abmil", "micromil"])
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="parallel (dataset, model) runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--work", default=str(ROOT / "runs" / "cv-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "cv_table"))
    args = ap.parse_args()

    from micromil_core.data.datasets import prepare_dataset

    for ds in args.datasets:
        target = Path(args.work) / "data" / ds
        if not (target / "sites.yaml").is_file():
            prepare_dataset(ds, target, seed=args.seed)
    jobs = [(d, m) for d in args.datasets for m in args.models]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args), jobs))
    for r in rows:
        print(json.dumps({k: r.get(k) for k in ("dataset", "model", "auc_mean", "accuracy_mean", "seconds", "error")}))
    by = {(r["dataset"], r["model"]): r for r in rows}
    header = "| dataset | " + " | ".join(f"{m} accuracy | {m} AUC" for m in args.models) + " | literature accuracy (attention MIL) |"
    lines = [
        f"# {args.folds}-fold cross-validation (seed {args.seed}, same folds for all models)",
        "",
        f"Command: `python benchmarks/cv_table.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Mean ± std over folds. Model selection / early stopping on a validation split of each",
        "training part; the test fold is never used for selection.",
        "",
        header,
        "|---" * (2 + 2 * len(args.models)) + "|",
    ]
    for d in args.datasets:
        cells = []
        for m in args.models:
            r = by.get((d, m), {})
            if "error" in r:
                cells += ["failed", "failed"]
            else:
                cells += [f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}",
                          f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f}"]
        lit = f"{LITERATURE[d]:.3f}" if d in LITERATURE else "-"
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {lit} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
