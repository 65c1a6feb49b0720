"""Federated MIL methods side by side: the same hospitals, the same held-out hospital.

Each model runs the federation of configs/sim-fashion.yaml (Fashion-MNIST bag benchmark,
5 training hospitals with Dirichlet(0.5) label skew, 1 held out, FedAvg) with only the
``model:`` section swapped. A model name here is a configuration: the ``model:`` section
of configs/cv/<name>.yaml when that file exists (e.g. mhim-abmil builds ``mhim`` around
ABMIL), else the registry model of that name with default params.

    python benchmarks/federated_models.py
    python benchmarks/federated_models.py --models abmil mhim-abmil --rounds 5
    python benchmarks/federated_models.py --seeds 0 1 2      # mean ± std over training seeds
    # continue from each seed's finished ABMIL federation, plainly or with MHIM (paired):
    python benchmarks/federated_models.py --models abmil mhim-abmil-converged --seeds 0 1 2 \
        --initial-model /tmp/fedm/fashion-abmil-seed{seed}/model.pt --tag cont \
        --compare abmil:mhim-abmil-converged

Reported: held-out AUC/accuracy of the last round's global model (never selected on the
held-out site), wall seconds inside the rounds, and megabytes exchanged per round (MHIM's
teacher stays on the site, so its payload must equal its base model's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml
from federation import (
    DATASETS,
    HERE,
    ROOT,
    check_pairs,
    micromil,
    paired_by_seed,
    prepared,
    spread,
    write_results,
)

DEFAULT_MODELS = ["micromil", "mhim-micromil", "abmil", "mhim-abmil", "transmil"]


def model_section(name: str) -> dict:
    """The ``model:`` section a configuration name stands for."""
    variant = ROOT / "configs" / "cv" / f"{name}.yaml"
    if variant.is_file():
        return dict(yaml.safe_load(variant.read_text())["model"])
    return {"name": name}


def run_model(name: str, data: Path, base_config: dict, work: Path, rounds: int, seed: int,
              initial_model: str = "", tag: str = "") -> dict:
    out = work / f"fashion-{name}{tag}-seed{seed}"
    config = {**base_config, "model": model_section(name)}
    if initial_model:
        path = initial_model.format(seed=seed)
        config["federation"] = {**config.get("federation", {}), "initial_model": path}
    config_file = work / f"fashion-{name}{tag}-seed{seed}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    if not (out / "metrics.json").is_file():  # a finished run of an interrupted table is kept
        micromil("simulate", "--config", str(config_file), "--data-root", str(data),
                 "--rounds", str(rounds), "--seed", str(seed), "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())["rounds"]
    return {
        "model": name,
        "model_config": config["model"],
        "seed": seed,
        "auc": metrics["auc"],
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "n_heldout": metrics["n"],
        "federated_seconds": sum(r["wall_seconds"] for r in history),
        "mb_per_round": sum(r["bytes_sent"] + r["bytes_received"] for r in history)
        / len(history) / 1e6,
        "total_seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    ap.add_argument("--work", default=str(ROOT / "runs" / "fed-models"))
    ap.add_argument("--out", default=str(HERE / "results" / "federated_models"))
    ap.add_argument("--initial-model", default="", metavar="PATH",
                    help="start every run from this model.pt ({seed} is replaced by the seed)")
    ap.add_argument("--tag", default="", help="suffix of the run folders of this variant")
    ap.add_argument("--compare", nargs="*", default=[], metavar="BASE:OTHER",
                    help="paired by seed (both in --models)")
    args = ap.parse_args()
    check_pairs(ap, args.compare, args.models)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepared("fashion", DATASETS, work)
    base_config = yaml.safe_load((ROOT / DATASETS["fashion"][2]).read_text())
    rows = [
        run_model(m, data, base_config, work, args.rounds, seed, args.initial_model,
                  f"-{args.tag}" if args.tag else "")
        for seed in args.seeds for m in args.models
    ]
    lines = [
        "# Federated MIL methods on the Fashion-MNIST bag benchmark (held-out hospital)",
        "",
        f"Command: `python benchmarks/federated_models.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"{DATASETS['fashion'][0]}, {' '.join(DATASETS['fashion'][1])}, Dirichlet(0.5); "
        f"FedAvg, {args.rounds} rounds x 1 local epoch, training seeds "
        f"{','.join(map(str, args.seeds))} (mean ± std over seeds). Metrics of",
        "the last round's global model on the held-out site (it never trains and nothing is",
        "selected on it). Model settings: the `model:` section of configs/cv/<model>.yaml.",
        *([f"Every run starts from `{args.initial_model}` (federation.initial_model)."]
          if args.initial_model else []),
        "",
        "| model | seeds | held-out AUC | accuracy | balanced accuracy | fed rounds wall s | MB per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in args.models:
        rs = [r for r in rows if r["model"] == m]
        cells = [spread([r[k] for r in rs]) for k in ("auc", "accuracy", "balanced_accuracy")]
        lines.append(
            f"| {m} | {len(rs)} | {' | '.join(cells)} | "
            f"{spread([r['federated_seconds'] for r in rs])} | {rs[0]['mb_per_round']:.2f} |"
        )
    if args.compare:
        lines += ["", "Paired by training seed (same hospitals, same held-out patients):", "",
                  *paired_by_seed(rows, args.compare, ("auc", "accuracy"), lambda r, k: r[k])]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
