"""What federation costs on one machine: R federated rounds vs R pooled epochs.

Both train MicroMIL on the same training sites' patients for the same number of passes
(pooled: R epochs, no early stopping; federated: R rounds x 1 local epoch, FedAvg) and
use the same threads. Reported: the simulation engine's start-up, the mean wall time of
a round (local training on every site + evaluation of the global model on every site +
messaging), and the payload bytes per round.

    python benchmarks/federation_overhead.py --data-root data/ucsb --rounds 20
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "sim-ucsb.yaml"))
    ap.add_argument("--work", default="/tmp/fed-overhead")
    ap.add_argument("--out", default=str(HERE / "results" / "federation_overhead"))
    args = ap.parse_args()

    from micromil_core.config import load_config
    from micromil_core.data.data_root import read_sites_yaml
    from micromil_core.training.fitting import train_pooled
    from server.simulation import simulate

    cfg = load_config(args.config, [f"simulation.data_root={args.data_root}",
                                    f"federation.rounds={args.rounds}"])
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    root = read_sites_yaml(args.data_root)
    pooled_cfg = replace(cfg, train=replace(cfg.train, epochs=args.rounds, patience=0))
    start = time.perf_counter()
    train_pooled(list(root.train_sites), pooled_cfg, work / "pooled")
    pooled = time.perf_counter() - start

    start = time.perf_counter()
    simulate(cfg, work / "federated")
    federated_total = time.perf_counter() - start
    rounds = json.loads((work / "federated" / "history.json").read_text())["rounds"]
    in_rounds = sum(r["wall_seconds"] for r in rounds)
    # Each simulated site process pays its first-use imports (torch.optim's torch._dynamo,
    # scikit-learn's metrics) in the first rounds; the pooled process pays them once.
    later = [r["wall_seconds"] for r in rounds[2:]] or [math.nan]
    per_round_bytes = sum(r["bytes_sent"] + r["bytes_received"] for r in rounds) / len(rounds)
    result = {
        "rounds": args.rounds,
        "train_sites": [p.name for p in root.train_sites],
        "holdout_sites": [p.name for p in root.holdout_sites],
        "pooled_seconds": pooled,
        "federated_total_seconds": federated_total,
        "federated_round_seconds_sum": in_rounds,
        "engine_startup_and_preflight_seconds": federated_total - in_rounds,
        "mean_round_seconds": in_rounds / len(rounds),
        "rounds_over_pooled": in_rounds / pooled,
        "first_two_rounds_seconds": sum(r["wall_seconds"] for r in rounds[:2]),
        "mean_round_seconds_after_two": sum(later) / len(later),
        "pooled_mean_epoch_seconds": pooled / args.rounds,
        "bytes_per_round": per_round_bytes,
        "bytes_sent_per_round": sum(r["bytes_sent"] for r in rounds) / len(rounds),
        "bytes_received_per_round": sum(r["bytes_received"] for r in rounds) / len(rounds),
    }
    lines = [
        f"# Cost of federation: {args.rounds} FedAvg rounds vs {args.rounds} pooled epochs",
        "",
        f"Command: `python benchmarks/federation_overhead.py {' '.join(sys.argv[1:])}`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| pooled training, {args.rounds} epochs | {pooled:.1f} s |",
        f"| federated, {args.rounds} rounds (inside rounds) | {in_rounds:.1f} s |",
        f"| federated, engine start-up + pre-flight + final report | {federated_total - in_rounds:.1f} s |",
        f"| federated rounds / pooled epochs | {result['rounds_over_pooled']:.2f}x |",
        f"| mean wall time of one round | {in_rounds / len(rounds):.2f} s |",
        f"| rounds 1-2 (each site process's first-use imports) | {result['first_two_rounds_seconds']:.2f} s |",
        f"| mean wall time of rounds 3+ / of a pooled epoch | {result['mean_round_seconds_after_two']:.2f} s / "
        f"{result['pooled_mean_epoch_seconds']:.2f} s |",
        f"| payload per round (sent + received) | {per_round_bytes / 1e6:.2f} MB |",
        f"| payload per round sent / received | {result['bytes_sent_per_round'] / 1e6:.2f} / {result['bytes_received_per_round'] / 1e6:.2f} MB |",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
