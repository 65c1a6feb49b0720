"""Local-only vs pooled vs federated MicroMIL on held-out hospitals, plus the cost of
federation (wall time and bytes) -- the evidence table of the federation.

    python benchmarks/federation.py                       # ucsb-breast and fashion-bags
    python benchmarks/federation.py --datasets ucsb --strategies fedavg --rounds 5

Every number is measured on the held-out site(s), which never train. Local and pooled
models train rounds x local_epochs epochs with validation-based selection; the federated
model is the last round's global model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Partition seeds were picked by the shape of the split alone, before any training: with
# 58 UCSB patients, seed 0 of Dirichlet(0.5) leaves a 5-patient held-out site with one
# positive (no usable AUC); seed 1 keeps strong label skew across the training sites
# (6/1, 3/17, 11/1 negative/positive) and holds out 19 patients of both classes.
DATASETS = {
    "ucsb": (
        "ucsb-breast",
        ["--sites", "3", "--holdout-sites", "1", "--seed", "1"],
        "configs/sim-ucsb.yaml",
    ),
    "fashion": (
        "fashion-bags:standard/3",
        ["--sites", "5", "--holdout-sites", "1", "--max-bags", "1500", "--seed", "0"],
        "configs/sim-fashion.yaml",
    ),
    # Four times the bags of "fashion" (same partition rule and seed): more test patients
    # of each class per site, so a per-site AUC is judged on more than one or two patients.
    "fashion-large": (
        "fashion-bags:standard/3",
        ["--sites", "5", "--holdout-sites", "1", "--max-bags", "6000", "--seed", "0"],
        "configs/sim-fashion.yaml",
    ),
    # The same bags, partition and splits, and each hospital's images through its own
    # intensity curve (data/site_shift.py): sites that differ in how images look, not only
    # in their label mix.
    "fashion-shift": (
        "fashion-bags:standard/3",
        ["--sites", "5", "--holdout-sites", "1", "--max-bags", "1500", "--seed", "0",
         "--site-shift", "intensity:0.4"],
        "configs/sim-fashion.yaml",
    ),
}


def micromil(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "micromil_core.cli", *args], check=True)


def prepared(key: str, datasets: dict, work: Path) -> Path:
    """The data root of benchmark dataset ``key`` under ``work``, prepared once."""
    name, split_args, _ = datasets[key]
    data = work / "data" / key
    if not (data / "sites.yaml").is_file():
        micromil("datasets", "prepare", name, "--out", str(data), *split_args,
                 "--partition", "dirichlet:0.5")
    return data


def write_results(out: str | Path, rows: list[dict], lines: list[str]) -> Path:
    """Rows as OUT.json and the table as OUT.md (printed too); returns OUT."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def run_compare(key: str, strategy: str, seed: int, data: Path, config: str, work: Path,
                rounds: int) -> dict:
    out = work / f"{key}-{strategy}-seed{seed}"
    start = time.perf_counter()
    micromil("compare", "--config", str(ROOT / config), "--data-root", str(data),
             "--strategy", strategy, "--rounds", str(rounds), "--seed", str(seed),
             "--out", str(out))
    table = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "federated" / "history.json").read_text())["rounds"]
    return {
        "dataset": key, "strategy": strategy, "seed": seed, "table": table,
        "compare_seconds": time.perf_counter() - start,
        "federated_seconds": sum(r["wall_seconds"] for r in history),
        "pooled_seconds": json.loads((out / "timing.json").read_text())["pooled_seconds"],
        "bytes_per_round": sum(r["bytes_sent"] + r["bytes_received"] for r in history) / len(history),
    }


def spread(values: list[float]) -> str:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std():.3f}"


def model_config_args(name: str) -> list[str]:
    """`micromil` arguments for a configuration name: configs/cv/<name>.yaml when it exists
    (e.g. mhim-abmil builds `mhim` around ABMIL), configs/<name>.yaml for a name with a
    folder (e.g. micromil/distinct, a variant of issue 19), else the registry model."""
    folder = "" if "/" in name else "cv"
    config = ROOT / "configs" / folder / f"{name}.yaml"
    if "/" in name and not config.is_file():
        raise SystemExit(f"configuration {name!r}: {config} does not exist")
    return ["--config", str(config)] if config.is_file() else ["--model", name]


def variant_params(name: str) -> dict:
    """``model.params`` of a variant named by folder (configs/<name>.yaml, e.g.
    micromil/distinct); {} for a plain model name (its defaults)."""
    if "/" not in name:
        return {}
    from micromil_core.config import load_config

    return dict(load_config(ROOT / "configs" / f"{name}.yaml").model.params)


def check_pairs(ap: argparse.ArgumentParser, pairs: list[str], models: list[str]) -> None:
    """Every ``--compare`` value is BASE:OTHER with both in ``--models``, or the parser exits."""
    for pair in pairs:
        if pair.count(":") != 1 or not set(pair.split(":")) <= set(models):
            ap.error(f"--compare {pair!r}: expected BASE:OTHER with both in --models {models}")


def paired_by_seed(rows: list[dict], pairs: list[str], keys: tuple[str, ...],
                   value: Callable[[dict, str], float]) -> list[str]:
    """Markdown rows comparing OTHER with BASE for each ``BASE:OTHER`` in ``pairs``, paired by
    training seed on the same data and the same evaluation patients: mean difference, its
    standard error, the 95 % interval and a paired t-test over seeds."""
    import numpy as np

    from micromil_core.training.metrics import corrected_paired_ttest

    lines = ["| comparison | metric | difference (mean over seeds) | SE | 95% interval | paired t-test p "
             "| seeds where it is higher |", "|---|---|---|---|---|---|---|"]
    for pair in pairs:
        base, other = pair.split(":")
        by = {m: {r["seed"]: r for r in rows if r["model"] == m and "error" not in r} for m in (base, other)}
        seeds = sorted(set(by[base]) & set(by[other]))
        if len(seeds) < 2:
            lines.append(f"| {other} - {base} | | needs 2 seeds of both | | | | |")
            continue
        for key in keys:
            diffs = np.array([value(by[other][s], key) - value(by[base][s], key) for s in seeds])
            t = corrected_paired_ttest(diffs, test_train_ratio=0.0)  # same evaluation set: the plain test
            lines.append(f"| {other} - {base} | {key} | {t['mean']:+.3f} | {t['se']:.3f} | "
                         f"[{t['low']:+.3f}, {t['high']:+.3f}] | {t['p']:.2f} | {int((diffs > 0).sum())}/{len(seeds)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ucsb", "fashion"], choices=list(DATASETS))
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="training seeds (same partition); several give a mean and spread")
    ap.add_argument("--work", default=str(ROOT / "runs" / "fed-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "federation"))
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for key in args.datasets:
        data, config = prepared(key, DATASETS, work), DATASETS[key][2]
        for strategy in args.strategies:
            for seed in args.seeds:
                rows.append(run_compare(key, strategy, seed, data, config, work, args.rounds))
    lines = [
        "# Federated vs pooled vs local-only MicroMIL on held-out hospitals",
        "",
        f"Command: `python benchmarks/federation.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "AUC on the held-out site(s); mean ± std over training seeds when several were run",
        "(same partition). Wall seconds: federated = inside rounds; pooled = training.",
        "",
        "| dataset | strategy | seeds | federated AUC | pooled AUC | local-only mean AUC | federated - pooled | federated acc | pooled acc | fed rounds wall s | pooled wall s | MB per round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["strategy"]), []).append(r)
    for (key, strategy), rs in groups.items():
        def col(path: tuple[str, str], rs=rs) -> list[float]:
            return [r["table"][path[0]][path[1]] for r in rs]

        diff = [f - p for f, p in zip(col(("federated", "auc")), col(("pooled", "auc")), strict=True)]
        lines.append(
            f"| {key} | {strategy} | {','.join(str(r['seed']) for r in rs)} | "
            f"{spread(col(('federated', 'auc')))} | {spread(col(('pooled', 'auc')))} | "
            f"{spread(col(('local_mean', 'auc')))} | {spread(diff)} | "
            f"{spread(col(('federated', 'accuracy')))} | {spread(col(('pooled', 'accuracy')))} | "
            f"{spread([r['federated_seconds'] for r in rs])} | {spread([r['pooled_seconds'] for r in rs])} | "
            f"{rs[0]['bytes_per_round'] / 1e6:.2f} |"
        )
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
