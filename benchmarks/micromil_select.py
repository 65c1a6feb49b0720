"""Choose MicroMIL's default representative draw on VALIDATION figures only (issue 19).

Applies the rule written in configs/micromil/README.md before any candidate ran:
- ucsb-breast: 10-fold CV, seed 0 (benchmarks/cv_table.py); per fold, the validation split
  carved from the training part gives the AUC at the selected epoch and the diversity of
  its bags (`validation` in each run's metrics.json);
- fashion-sparse: benchmarks/sparse_bags.py, training seeds 0 and 1; the validation
  split's AUC, and the diversity of the validation bags;
- eligible: validation median diversity >= 0.8 on both; among the eligible, the highest
  mean validation AUC over the two datasets; a lead below 0.01 AUC goes to the candidate
  with fewer parts (assign_tau 1 and no KL term before the others).

Test-fold and test-split figures are never read here.

    .venv/bin/python benchmarks/micromil_select.py --cv-work W --sparse-work S \\
        --candidates micromil/released micromil/distinct ... --out benchmarks/results/micromil_selection
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import variant_params, write_results  # noqa: E402
from micromil_mechanism import run_name, sparse_validation_diversity  # noqa: E402

MIN_MEDIAN_DIVERSITY = 0.8
LEAD = 0.01


def parts(candidate: str) -> int:
    """How many optional parts a candidate adds: a sharpened membership, the KL term."""
    params = variant_params(candidate)
    return int(float(params.get("assign_tau", 1.0)) != 1.0) + int(float(params.get("kl_weight", 0.0)) > 0)


def ucsb_validation(work: Path, candidate: str, seed: int) -> dict:
    m = json.loads((work / "runs" / f"ucsb-breast-{run_name(candidate)}-seed{seed}" / "metrics.json").read_text())
    return {"auc": m["validation"]["auc_mean"], "median_diversity": m["validation"]["representative_diversity"]["median"]}


def sparse_validation(work: Path, candidate: str, seeds: list[int]) -> dict:
    site = work / "data" / "site-0"
    aucs, medians = [], []
    for seed in seeds:
        run = work / "runs" / f"{candidate}-seed{seed}"
        aucs.append(json.loads((run / "metrics.json").read_text())["validation"]["auc"])
        medians.append(sparse_validation_diversity(run, site)["median"])
    return {"auc": float(np.mean(aucs)), "median_diversity": float(np.mean(medians))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cv-work", required=True)
    ap.add_argument("--sparse-work", required=True)
    ap.add_argument("--candidates", nargs="+", required=True)
    ap.add_argument("--cv-seed", type=int, default=0)
    ap.add_argument("--sparse-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for c in args.candidates:
        u = ucsb_validation(Path(args.cv_work), c, args.cv_seed)
        f = sparse_validation(Path(args.sparse_work), c, args.sparse_seeds)
        eligible = min(u["median_diversity"], f["median_diversity"]) >= MIN_MEDIAN_DIVERSITY
        rows.append({"candidate": c, "ucsb": u, "fashion_sparse": f, "eligible": eligible,
                     "mean_auc": (u["auc"] + f["auc"]) / 2, "parts": parts(c)})
    pool = [r for r in rows if r["eligible"]]
    chosen = None
    if pool:
        best = max(r["mean_auc"] for r in pool)
        near = [r for r in pool if best - r["mean_auc"] < LEAD]
        chosen = min(near, key=lambda r: (r["parts"], -r["mean_auc"]))["candidate"]
    lines = [
        "# MicroMIL's default, chosen on validation figures only (issue 19)", "",
        f"Command: `python benchmarks/micromil_select.py {' '.join(sys.argv[1:])}`", "",
        "Rule (configs/micromil/README.md, written before the runs): eligible when the validation "
        f"median diversity is >= {MIN_MEDIAN_DIVERSITY} on both datasets; the highest mean validation "
        f"AUC wins; a lead below {LEAD} goes to the candidate with fewer parts. No test figure is read.", "",
        "The runs it reads: `python benchmarks/cv_table.py --datasets ucsb-breast --repeats 1 --models "
        f"{' '.join(args.candidates)} --work CV_WORK` and `python benchmarks/sparse_bags.py --seeds "
        f"{' '.join(map(str, args.sparse_seeds))} --models {' '.join(args.candidates)} --work SPARSE_WORK`.", "",
        f"| candidate | ucsb-breast validation AUC (10 folds, seed {args.cv_seed}) | ucsb-breast validation "
        "median diversity | fashion-sparse validation AUC (seeds "
        f"{', '.join(map(str, args.sparse_seeds))}) | fashion-sparse validation median diversity | "
        "eligible | mean validation AUC | parts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['ucsb']['auc']:.3f} | {r['ucsb']['median_diversity']:.2f} | "
                     f"{r['fashion_sparse']['auc']:.3f} | {r['fashion_sparse']['median_diversity']:.2f} | "
                     f"{'yes' if r['eligible'] else 'no'} | {r['mean_auc']:.3f} | {r['parts']} |")
    lines += ["", f"Chosen: **{chosen}**" if chosen else "No candidate is eligible."]
    rows.append({"chosen": chosen})
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
