"""Privacy-utility table: held-out AUC of federated MicroMIL with local DP-SGD at several
budgets (epsilon per site over the whole run, privacy unit = one patient) and without DP.

    python benchmarks/privacy_utility.py                          # fashion + ucsb, eps 1/3/8/none
    python benchmarks/privacy_utility.py --datasets fashion --epsilons 8 --seeds 0 1 2
    python benchmarks/privacy_utility.py --datasets fashion --tag small \
        --set model.params.proj_dim=32 --set model.params.gnn_hidden=32 \
        --dp-set federation.local_epochs=4 --dp-set train.lr=1e-2   # a variant, all arms

Every arm uses the same sites, held-out site and model. The non-private arm is the
standard federated configuration (configs/sim-<dataset>.yaml); the DP arms add the DP-SGD
settings of configs/dp-sgd.yaml's kind: Poisson rate 0.25 (few large batches: DP noise is
added per step, so the signal-to-noise of an epoch grows with the batch) and a learning
rate of 5e-3 for those batches (chosen on a training site's own validation split, never on
the held-out site). All arms standardise features per site, since DP sites keep their
statistics. The model is the last round's (no selection on the held-out site).

Fashion-MNIST bags use 6,000 bags here (the federation benchmark: 1,500): DP needs
hundreds of patients per site; with 1,500 bags the DP arms did not learn at all
(results/privacy_utility_1500.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from federation import DATASETS, HERE, ROOT, micromil, prepared, spread, write_results

DATASETS = {
    **DATASETS,
    "fashion": (
        "fashion-bags:standard/3",
        ["--sites", "5", "--holdout-sites", "1", "--max-bags", "6000", "--seed", "0"],
        "configs/sim-fashion.yaml",
    ),
}
SHARED = ["federation.scaler=site"]
DP = [
    "privacy.mode=dp-sgd", "privacy.delta=1e-5", "privacy.max_grad_norm=1.0",
    "privacy.sample_rate=0.25", "train.lr=5e-3",
]


def run_arm(key: str, epsilon: float | None, seed: int, data: Path, config: str, work: Path,
            args: argparse.Namespace) -> dict:
    tag = "none" if epsilon is None else f"eps{epsilon:g}"
    variant = f"-{args.tag}" if args.tag else ""
    out = work / f"{key}{variant}-{tag}-seed{seed}"
    settings = [*SHARED, *args.overrides, f"train.seed={seed}"]
    if epsilon is not None:
        settings += [*DP, *args.dp_overrides, f"privacy.target_epsilon={epsilon}"]
    if not (out / "metrics.json").is_file():
        micromil("simulate", "--config", str(ROOT / config), "--data-root", str(data),
                 "--rounds", str(args.rounds), "--out", str(out),
                 *[arg for s in settings for arg in ("--set", s)])
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())["rounds"]
    spent = [m["epsilon"] for m in history[-1]["train"].values() if "epsilon" in m]
    return {
        "dataset": key, "epsilon_target": epsilon, "seed": seed,
        "auc": metrics["auc"], "accuracy": metrics["accuracy"], "n": metrics["n"],
        "epsilon_spent_max": max(spent) if spent else None,
        "rounds": len(history), "seconds": sum(r["wall_seconds"] for r in history),
    }


def starting_model_row(key: str, data: Path, work: Path, args: argparse.Namespace) -> dict | None:
    """With ``federation.initial_model`` set: the starting model on the held-out site,
    before any round, so the table shows what the federation adds to it."""
    start = [o.split("=", 1)[1] for o in args.overrides if o.startswith("federation.initial_model=")]
    if not start:
        return None
    out = work / f"{key}{f'-{args.tag}' if args.tag else ''}-start"
    if not (out / "metrics.json").is_file():
        micromil("evaluate", "--model", start[-1], "--data-root", str(data), "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"dataset": key, "epsilon_target": "start", "seed": "-", "auc": metrics["auc"],
            "accuracy": metrics["accuracy"], "n": metrics["n"], "epsilon_spent_max": None,
            "rounds": 0, "seconds": 0.0}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in dict.fromkeys(r["dataset"] for r in rows):
        dp = sorted({r["epsilon_target"] for r in rows
                     if r["dataset"] == key and isinstance(r["epsilon_target"], float)})
        means = [np.mean([r["auc"] for r in rows if r["dataset"] == key and r["epsilon_target"] == e]) for e in dp]
        line = ax.plot(dp, means, marker="o", label=f"{key}: DP-SGD")[0]
        base = [r["auc"] for r in rows if r["dataset"] == key and r["epsilon_target"] is None]
        if base:
            ax.axhline(np.mean(base), ls="--", color=line.get_color(), label=f"{key}: no DP")
        start = [r["auc"] for r in rows if r["dataset"] == key and r["epsilon_target"] == "start"]
        if start:
            ax.axhline(start[0], ls=":", color=line.get_color(), label=f"{key}: starting model")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon per site (delta 1e-5, one patient = one unit)")
    ax.set_ylabel("held-out AUC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["fashion", "ucsb"], choices=list(DATASETS))
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--baseline-seeds", type=int, nargs="+", default=None,
                    help="seeds of the non-DP arm (default: --seeds); it varies far less")
    ap.add_argument("--work", default=str(ROOT / "runs" / "privacy-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "privacy_utility"))
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override for every arm (e.g. a smaller model)")
    ap.add_argument("--dp-set", dest="dp_overrides", action="append", default=[],
                    help="config override for the DP arms only (e.g. their optimiser)")
    ap.add_argument("--tag", default="", help="suffix of this variant's run folders")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for key in args.datasets:
        data, config = prepared(key, DATASETS, work), DATASETS[key][2]
        for epsilon in [None, *args.epsilons]:
            seeds = args.baseline_seeds if epsilon is None and args.baseline_seeds else args.seeds
            for seed in seeds:
                rows.append(run_arm(key, epsilon, seed, data, config, work, args))
        if start := starting_model_row(key, data, work, args):
            rows.append(start)
    lines = [
        "# Privacy-utility: federated MicroMIL with local DP-SGD (per patient) on held-out sites",
        "",
        f"Command: `python benchmarks/privacy_utility.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"{args.rounds} rounds, FedAvg, 1 local epoch unless set below; every arm: "
        f"{', '.join(SHARED + args.overrides)}.",
        f"DP arms: {', '.join(DP[1:] + args.dp_overrides)} (later settings win); noise "
        "calibrated so the run spends the budget.",
        "AUC/accuracy of the last round's model on the held-out site; mean ± std over seeds.",
        "",
        "| dataset | epsilon (target) | epsilon spent (max site) | seeds | held-out AUC | AUC - no DP | accuracy | n | wall s in rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["epsilon_target"]), []).append(r)
    for (key, eps), rs in groups.items():
        base = groups.get((key, None), [])
        # Mean DP AUC minus mean non-DP AUC (the arms may have different seeds).
        gap = [r["auc"] - sum(b["auc"] for b in base) / len(base) for r in rs] if eps is not None and base else []
        spent = [r["epsilon_spent_max"] for r in rs if r["epsilon_spent_max"] is not None]
        label = {None: "none", "start": "starting model, no rounds"}.get(eps) or f"{eps:g}"
        lines.append(
            f"| {key} | {label} | "
            f"{f'{max(spent):.2f}' if spent else '-'} | {','.join(str(r['seed']) for r in rs)} | "
            f"{spread([r['auc'] for r in rs])} | {spread(gap) if gap else '-'} | "
            f"{spread([r['accuracy'] for r in rs])} | {rs[0]['n']} | "
            f"{spread([r['seconds'] for r in rs]) if rs[0]['rounds'] else '-'} |"
        )
    out = write_results(args.out, rows, lines)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
