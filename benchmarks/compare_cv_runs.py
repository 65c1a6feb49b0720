"""Fold by fold: do two cross-validation tables of the same model and seeds agree?

For a change that should not change results (a faster implementation of the same maths),
run ``cv_table.py`` with the new code for seeds the old table also has, then compare:

    python benchmarks/compare_cv_runs.py --old benchmarks/results/cv_table_micromil_default.json \\
        --new /tmp/cvfast/cv_table_micromil_fast.json --model micromil/distinct-instances \\
        --out benchmarks/results/micromil_fast_step_cv

Reports per dataset the mean test-fold AUC of both, the mean paired difference with its
standard deviation over folds, and how many folds gave exactly the same AUC.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def fold_aucs(path: str, model: str) -> dict[tuple[str, int], list[float]]:
    """{(dataset, seed): [AUC of each test fold]} of one model in a cv_table JSON."""
    runs = json.loads(Path(path).read_text())["runs"]
    return {(r["dataset"], r["seed"]): [f["auc"] for f in r["per_fold"]]
            for r in runs if r["model"] == model and "per_fold" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="results path without suffix (.md and .json)")
    args = ap.parse_args()
    old, new = fold_aucs(args.old, args.model), fold_aucs(args.new, args.model)
    shared = sorted(set(old) & set(new))
    rows = []
    for dataset in sorted({d for d, _ in shared}):
        a = [x for d, s in shared if d == dataset for x in new[(d, s)]]
        b = [x for d, s in shared if d == dataset for x in old[(d, s)]]
        diff = [x - y for x, y in zip(a, b, strict=True)]
        rows.append({
            "dataset": dataset, "seeds": [s for d, s in shared if d == dataset], "folds": len(a),
            "new_auc": statistics.mean(a), "old_auc": statistics.mean(b),
            "mean_difference": statistics.mean(diff), "sd_difference": statistics.stdev(diff),
            "identical_folds": sum(abs(d) < 1e-12 for d in diff),
        })
    lines = [
        f"# {args.model}: new vs old code, same folds and seeds",
        "",
        f"Command: `python benchmarks/compare_cv_runs.py --old {args.old} --new {args.new} "
        f"--model {args.model} --out {args.out}`",
        "",
        "| dataset | seeds | folds | new AUC | old AUC | new - old (mean ± sd over folds) | identical folds |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {','.join(map(str, r['seeds']))} | {r['folds']} | {r['new_auc']:.3f} | "
            f"{r['old_auc']:.3f} | {r['mean_difference']:+.4f} ± {r['sd_difference']:.3f} | "
            f"{r['identical_folds']}/{r['folds']} |"
        )
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
