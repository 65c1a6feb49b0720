"""Does MicroMIL's representative draw survive federation? (issue 19, item 5)

FedAvg averages every site's centroids into one set; averaged centroids can re-collapse
the representatives even when each site's own model picks distinct ones. For each
federation of benchmarks/federation.py (UCSB 3 + 1 sites, Fashion bags 5 + 1 sites, both
Dirichlet(0.5)), each MicroMIL variant and each training seed, this runs `micromil compare`
(local-only, pooled and federated FedAvg models) and then `micromil evaluate` of the
pooled and the federated model on the HELD-OUT site, which never trained:
AUC, representative diversity (distinct / min(N, K): mean / median / share of bags whose
picks are one instance) and cluster coverage (occupied clusters shown by one of their own
members), pooled beside federated.

    .venv/bin/python benchmarks/micromil_federated_mechanism.py --work W --seeds 0 1 2 \\
        --variants micromil/released micromil --out benchmarks/results/micromil_federated_mechanism

A variant is `micromil` (today's defaults) or configs/<name>.yaml, whose model.params are
passed as --set overrides on top of the federation's own config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import DATASETS, ROOT, micromil, prepared, spread, variant_params, write_results  # noqa: E402


def variant_overrides(variant: str) -> list[str]:
    """--set arguments that turn the federation's config into ``variant``."""
    params = variant_params(variant)
    out = []
    for key, value in params.items():
        out += ["--set", f"model.params.{key}={value}"]
    return out


def heldout_figures(model: Path, data: Path, out: Path) -> dict:
    """AUC, accuracy and the representative figures of ``model`` on the held-out site(s)."""
    if not (out / "metrics.json").is_file():
        micromil("evaluate", "--model", str(model), "--data-root", str(data), "--out", str(out))
    m = json.loads((out / "metrics.json").read_text())
    return {"auc": m.get("auc"), "accuracy": m.get("accuracy"), "diversity": m.get("representative_diversity")}


def run_one(key: str, variant: str, seed: int, work: Path, rounds: int) -> dict:
    data, config = prepared(key, DATASETS, work), DATASETS[key][2]
    out = work / "runs" / f"{key}-{variant.replace('/', '_')}-seed{seed}"
    if not (out / "metrics.json").is_file():
        micromil("compare", "--config", str(ROOT / config), "--data-root", str(data),
                 "--rounds", str(rounds), "--seed", str(seed), "--out", str(out),
                 *variant_overrides(variant))
    row = {"dataset": key, "variant": variant, "seed": seed}
    for arm in ("pooled", "federated"):
        row[arm] = heldout_figures(out / arm / "model.pt", data, out / arm / "heldout")
    return row


def cell(rows: list[dict], arm: str, key: str) -> str:
    vals = [r[arm]["diversity"][key] for r in rows if r[arm]["diversity"] and key in r[arm]["diversity"]]
    return spread(vals) if vals else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ucsb", "fashion"], choices=list(DATASETS))
    ap.add_argument("--variants", nargs="+", default=["micromil/released", "micromil"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--work", default=str(ROOT / "runs" / "fed-mechanism"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "micromil_federated_mechanism"))
    args = ap.parse_args()
    work = Path(args.work)
    rows = [run_one(k, v, s, work, args.rounds) for k in args.datasets for v in args.variants for s in args.seeds]
    lines = [
        "# MicroMIL's representatives after federation, on the held-out site (issue 19, item 5)",
        "",
        f"Command: `python benchmarks/micromil_federated_mechanism.py {' '.join(sys.argv[1:])}`",
        "",
        "Every figure is measured on the held-out site, which never trained; mean ± std over "
        "training seeds. Diversity: distinct representatives / min(N, K) per bag (mean, median, "
        "share of bags whose picks are ONE instance). Coverage: per bag, the clusters owning an "
        "instance (hard assignment) that are shown by one of their own members.",
        "",
        "| dataset | variant | arm | seeds | AUC | accuracy | diversity mean | diversity median "
        "| one-instance bags | cluster coverage |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in args.datasets:
        for variant in args.variants:
            rs = [r for r in rows if r["dataset"] == key and r["variant"] == variant]
            for arm in ("pooled", "federated"):
                lines.append(
                    f"| {key} | {variant} | {arm} | {','.join(str(r['seed']) for r in rs)} | "
                    f"{spread([r[arm]['auc'] for r in rs])} | {spread([r[arm]['accuracy'] for r in rs])} | "
                    f"{cell(rs, arm, 'mean')} | {cell(rs, arm, 'median')} | "
                    f"{cell(rs, arm, 'single_fraction')} | {cell(rs, arm, 'cluster_coverage')} |"
                )
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
