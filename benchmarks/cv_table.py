"""10-fold cross-validation table of MIL models on the classic real MIL benchmarks.

Same folds for every model (they depend only on the seed and the labels). Each fold carves
a stratified validation set from its training part for model selection and early
stopping; the test fold is used once, after selection. Literature values: Ilse et al. 2018,
Table 1 (attention MIL, 10-fold CV), as cited in shared/METHODS.md.

    python benchmarks/cv_table.py                                   # full table
    python benchmarks/cv_table.py --datasets musk1 --models micromil --folds 3

A "model" here is a configuration name: configs/cv/<name>.yaml when it exists (it names the
registered model, e.g. mhim-abmil.yaml builds `mhim` around ABMIL), else a registry name
with default settings. With more than two models the table has one row per model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from federation import check_pairs, model_config_args

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LITERATURE = {"musk1": 0.892, "musk2": 0.858}  # Ilse et al. 2018, Table 1 (accuracy)


def run_one(dataset: str, model: str, seed: int, args: argparse.Namespace) -> dict:
    data = Path(args.work) / "data" / dataset
    tag = f"-{args.tag}" if args.tag else ""
    out = Path(args.work) / "runs" / f"{dataset}-{model.replace('/', '_')}{tag}-seed{seed}"
    cmd = [sys.executable, "-m", "micromil_core.cli", "cv", "--data", str(data / "site-0"),
           "--folds", str(args.folds), "--seed", str(seed),
           "--out", str(out), "--set", f"train.num_threads={args.threads}", *model_config_args(model)]
    for override in args.overrides:
        cmd += ["--set", override]
    timing = out / "bench-seconds.json"
    if args.resume and (out / "metrics.json").is_file():
        # A finished run of an interrupted table: reuse it rather than train it again.
        seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")
    else:
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"dataset": dataset, "model": model, "error": proc.stderr.strip()[-500:]}
        seconds = time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    summary = json.loads((out / "metrics.json").read_text())
    summary.update(dataset=dataset, model=model, seed=seed, seconds=seconds)
    return summary


def combine(runs: list[dict]) -> dict:
    """Pool the folds of repeated CV runs: mean over all folds; std of the repeat means."""
    import numpy as np

    out: dict = {"repeats": len(runs), "seconds": sum(r["seconds"] for r in runs)}
    for key in ("accuracy", "auc", "balanced_accuracy", "f1"):
        folds = np.array([f[key] for r in runs for f in r["per_fold"]], dtype=float)
        means = np.array([r[f"{key}_mean"] for r in runs], dtype=float)
        out[f"{key}_mean"] = float(np.nanmean(folds))
        out[f"{key}_fold_std"] = float(np.nanstd(folds))
        out[f"{key}_repeat_std"] = float(np.std(means)) if len(means) > 1 else 0.0
    return out


def _cell(r: dict, key: str) -> str:
    if "error" in r or not r:
        return "failed"
    return f"{r[key + '_mean']:.3f} ± {r[key + '_repeat_std']:.3f}"


def wide_table(by: dict, datasets: list[str], models: list[str]) -> list[str]:
    """One row per dataset, accuracy and AUC columns per model, literature beside them."""
    lines = [
        "| dataset | " + " | ".join(f"{m} accuracy | {m} AUC" for m in models)
        + " | literature accuracy (attention MIL) |",
        "|---" * (2 + 2 * len(models)) + "|",
    ]
    for d in datasets:
        cells = [_cell(by.get((d, m), {}), k) for m in models for k in ("accuracy", "auc")]
        lit = f"{LITERATURE[d]:.3f}" if d in LITERATURE else "-"
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {lit} |")
    return lines


def long_table(by: dict, datasets: list[str], models: list[str]) -> list[str]:
    """One row per model, accuracy and AUC columns per dataset; literature as a last row."""
    lines = [
        "| model | " + " | ".join(f"{d} accuracy | {d} AUC" for d in datasets) + " |",
        "|---" * (1 + 2 * len(datasets)) + "|",
    ]
    for m in models:
        cells = [_cell(by.get((d, m), {}), k) for d in datasets for k in ("accuracy", "auc")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lit = [f"{LITERATURE[d]:.3f} | -" if d in LITERATURE else "- | -" for d in datasets]
    lines.append("| literature (attention MIL, Ilse et al. 2018) | " + " | ".join(lit) + " |")
    return lines


def paired_table(rows: list[dict], datasets: list[str], pairs: list[str], folds: int,
                 metrics: tuple[str, ...] = ("accuracy", "auc")) -> list[str]:
    """Per-fold differences of each BASE:OTHER pair on the same folds, with the corrected
    resampled t-test and its 95% interval: a difference is only a finding when p is small,
    and a target on the difference is only missed when the interval lies beyond it."""
    import numpy as np

    from micromil_core.training.metrics import corrected_paired_ttest

    lines = [
        "| dataset | comparison | metric | difference (mean over folds) | corrected SE | 95% interval | p "
        "| repeats where it is higher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        base, other = pair.split(":")
        for d in datasets:
            runs = {m: {r["seed"]: r for r in rows if r["dataset"] == d and r["model"] == m and "error" not in r}
                    for m in (base, other)}
            seeds = sorted(set(runs[base]) & set(runs[other]))
            if not seeds:
                lines.append(f"| {d} | {other} - {base} | | failed | | | | |")
                continue
            for key in metrics:
                diffs = np.array([b[key] - a[key] for s in seeds
                                  for a, b in zip(runs[base][s]["per_fold"], runs[other][s]["per_fold"], strict=True)])
                test = corrected_paired_ttest(diffs, test_train_ratio=1.0 / (folds - 1))
                higher = sum(runs[other][s][f"{key}_mean"] > runs[base][s][f"{key}_mean"] for s in seeds)
                lines.append(f"| {d} | {other} - {base} | {key} | {test['mean']:+.3f} | {test['se']:.3f} | "
                             f"[{test['low']:+.3f}, {test['high']:+.3f}] | {test['p']:.2f} | {higher}/{len(seeds)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["musk1", "musk2", "ucsb-breast"])
    ap.add_argument("--models", nargs="+", default=["gated-abmil", "micromil"])
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="CV repeats with seeds seed..seed+R-1")
    ap.add_argument("--jobs", type=int, default=2, help="parallel (dataset, model) runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--work", default=str(ROOT / "runs" / "cv-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "cv_table"))
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config override for every run, e.g. train.refit=true")
    ap.add_argument("--tag", default="", help="suffix of the run folders of this variant")
    ap.add_argument("--resume", action="store_true",
                    help="reuse runs that already wrote metrics.json under --work")
    ap.add_argument("--compare", action="append", default=[], metavar="BASE:OTHER",
                    help="add a paired test of OTHER against BASE (both in --models), "
                         "e.g. abmil:mhim-abmil")
    args = ap.parse_args()
    check_pairs(ap, args.compare, args.models)

    from micromil_core.data.datasets import prepare_dataset

    for ds in args.datasets:
        target = Path(args.work) / "data" / ds
        if not (target / "sites.yaml").is_file():
            prepare_dataset(ds, target, seed=args.seed)
    seeds = [args.seed + r for r in range(args.repeats)]
    jobs = [(d, m, s) for s in seeds for d in args.datasets for m in args.models]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args), jobs))
    for r in rows:
        print(json.dumps({k: r.get(k) for k in ("dataset", "model", "seed", "auc_mean", "accuracy_mean", "seconds", "error")}))
    by = {}
    for d in args.datasets:
        for m in args.models:
            runs = [r for r in rows if r["dataset"] == d and r["model"] == m]
            failed = [r for r in runs if "error" in r]
            by[(d, m)] = failed[0] if failed else combine(runs)
    lines = [
        f"# {args.folds}-fold cross-validation x {args.repeats} repeats "
        f"(seeds {seeds[0]}..{seeds[-1]}, same folds for all models)",
        "",
        f"Command: `python benchmarks/cv_table.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Mean over all folds of all repeats ± std of the repeat means (fold std in the JSON).",
        "Model selection / early stopping on a validation split of each training part; the",
        "test fold is never used for selection. Hyper-parameters: configs/cv/<model>.yaml.",
        "",
    ]
    lines += (wide_table if len(args.models) <= 2 else long_table)(by, args.datasets, args.models)
    if args.compare:
        lines += [
            "",
            "Paired on the same folds: the difference per fold, and the corrected resampled",
            "t-test (Nadeau and Bengio 2003; n_test/n_train = 1/(folds-1)), which accounts for",
            "the training data that repeats and folds share; the interval is mean ± t(0.975) x SE.",
            "",
            *paired_table(rows, args.datasets, args.compare, args.folds),
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    combined = {f"{d}/{m}": v for (d, m), v in by.items()}
    out.with_suffix(".json").write_text(
        json.dumps({"combined": combined, "runs": rows}, indent=2, default=str) + "\n"
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
