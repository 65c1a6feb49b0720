"""What float16 transport of the sites' updates saves and costs (``federation.transport``).

The Fashion-MNIST federation of benchmarks/federation.py (5 hospitals with Dirichlet(0.5)
label skew + 1 held out, MicroMIL, FedAvg, configs/sim-fashion.yaml), run with float32 and
float16 transport for the same training seeds: bytes each round moves (sent to the sites,
received from them) and the held-out AUC, with the float16 minus float32 difference per
seed (same data, same seed: only the transport differs).

    python benchmarks/transport.py --work /tmp/transport          # writes results/transport.*
    python benchmarks/transport.py --work /tmp/transport --seeds 0 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from federation import DATASETS, micromil, prepared, write_results  # noqa: E402

TRANSPORTS = ("float32", "float16")


def run(data: Path, work: Path, transport: str, seed: int, rounds: int) -> dict:
    out = work / f"{transport}-seed{seed}"
    if not (out / "metrics.json").is_file():
        micromil("simulate", "--config", str(ROOT / DATASETS["fashion"][2]), "--data-root", str(data),
                 "--rounds", str(rounds), "--seed", str(seed), "--set", f"federation.transport={transport}",
                 "--out", str(out), "--overwrite")
    rounds_ = json.loads((out / "history.json").read_text())["rounds"]
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "transport": transport, "seed": seed, "auc": metrics.get("auc"),
        "bytes_sent": statistics.mean(r["bytes_sent"] for r in rounds_),
        "bytes_received": statistics.mean(r["bytes_received"] for r in rounds_),
        "failures": sum(len(r["failures"]) for r in rounds_),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="data and runs (reused when present)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "results" / "transport"))
    args = ap.parse_args()
    work = Path(args.work)
    data = prepared("fashion", DATASETS, work)
    rows = [run(data, work / "runs", t, s, args.rounds) for s in args.seeds for t in TRANSPORTS]
    by = {(r["transport"], r["seed"]): r for r in rows}
    lines = [
        "# float16 transport of the sites' updates: bytes and held-out AUC (Fashion federation)",
        "",
        "Command: `" + " ".join(["python benchmarks/transport.py", *sys.argv[1:]]) + "`",
        "",
        f"Fashion-MNIST bags, 5 training hospitals (Dirichlet(0.5)) + 1 held out, MicroMIL, FedAvg, "
        f"{args.rounds} rounds ({DATASETS['fashion'][2]}); per seed, only federation.transport differs.",
        "",
        "| seed | float32 MB sent / received per round | float16 MB sent / received per round | received ratio | held-out AUC float32 | float16 | float16 - float32 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    diffs = []
    for seed in args.seeds:
        a, b = by[("float32", seed)], by[("float16", seed)]
        diff = b["auc"] - a["auc"] if a["auc"] is not None and b["auc"] is not None else None
        if diff is not None:
            diffs.append(diff)
        lines.append(
            f"| {seed} | {a['bytes_sent'] / 1e6:.2f} / {a['bytes_received'] / 1e6:.2f} | "
            f"{b['bytes_sent'] / 1e6:.2f} / {b['bytes_received'] / 1e6:.2f} | "
            f"{b['bytes_received'] / a['bytes_received']:.2f} | {a['auc']:.3f} | {b['auc']:.3f} | "
            + (f"{diff:+.3f} |" if diff is not None else "n/a |")
        )
    if diffs:
        lines += ["", f"Mean AUC difference float16 - float32 over {len(diffs)} seeds: "
                      f"{statistics.mean(diffs):+.4f} (min {min(diffs):+.4f}, max {max(diffs):+.4f})."]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
