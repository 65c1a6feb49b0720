"""Should training default to batches of bags? Decided on validation, reported on CV.

Runs (or reuses, ``--resume``) ``cv_table.py`` twice on the classic real MIL benchmarks,
once with the default ``train.batch_size=1`` and once with ``train.batch_size=32``, same
folds and seeds, everything else at its default (learning rate included: the question is
whether batching can be switched on as it is). Rule, fixed before the runs: batch 32
becomes a model's default only if, on every dataset, its mean validation AUC (over folds
and repeats; validation splits are carved from each fold's training part) is at least
batch 1's minus 0.005. Test-fold AUCs are reported beside it, never used to decide.

    python benchmarks/batch_size.py --work /tmp/cvbatch --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from federation import write_results  # noqa: E402

TOLERANCE = 0.005
VARIANTS = {"b1": [], "b32": ["--set", "train.batch_size=32"]}


def _runs(work: Path, dataset: str, model: str, tag: str, seeds: list[int]) -> list[dict]:
    out = []
    for seed in seeds:
        run = work / "runs" / f"{dataset}-{model}-{tag}-seed{seed}"
        metrics = json.loads((run / "metrics.json").read_text())
        seconds = json.loads((run / "bench-seconds.json").read_text()) if (run / "bench-seconds.json").is_file() else {}
        out.append({"val_auc": metrics["validation"]["auc_mean"], "test_auc": metrics["auc_mean"],
                    "seconds": seconds.get("seconds")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cvbatch")
    ap.add_argument("--datasets", nargs="+", default=["musk1", "musk2", "ucsb-breast"])
    ap.add_argument("--models", nargs="+", default=["gated-abmil", "micromil"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "batch_size"))
    args = ap.parse_args()
    work = Path(args.work)
    for tag, extra in VARIANTS.items():
        subprocess.run([sys.executable, str(HERE / "cv_table.py"), "--resume", "--repeats", str(args.repeats),
                        "--tag", tag, "--work", str(work), "--out", str(work / tag),
                        "--datasets", *args.datasets, "--models", *args.models, *extra], check=True)
    seeds = list(range(args.repeats))
    rows, lines = [], [
        "# Batch of 32 bags vs one bag per step (10-fold CV x "
        f"{args.repeats} repeats, real data)",
        "",
        f"Command: `python benchmarks/batch_size.py --work {args.work} --repeats {args.repeats}`",
        "",
        f"Rule (fixed before the runs): batch 32 becomes a model's default only if on every dataset "
        f"its mean validation AUC is >= batch 1's - {TOLERANCE}. Test AUC is reported, not used.",
        "",
        "| dataset | model | val AUC b1 | val AUC b32 | b32 - b1 (val) | test AUC b1 | test AUC b32 | CV time b1 / b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdict = {m: True for m in args.models}
    for d in args.datasets:
        for m in args.models:
            one, many = _runs(work, d, m, "b1", seeds), _runs(work, d, m, "b32", seeds)
            v1, v32 = (statistics.mean(r["val_auc"] for r in x) for x in (one, many))
            t1, t32 = (statistics.mean(r["test_auc"] for r in x) for x in (one, many))
            secs = [sum(r["seconds"] or 0 for r in x) for x in (one, many)]
            verdict[m] &= v32 >= v1 - TOLERANCE
            rows.append({"dataset": d, "model": m, "val_auc_b1": v1, "val_auc_b32": v32,
                         "test_auc_b1": t1, "test_auc_b32": t32, "seconds_b1": secs[0], "seconds_b32": secs[1]})
            speed = f"{secs[0] / secs[1]:.2f}x" if secs[1] else "n/a"
            lines.append(f"| {d} | {m} | {v1:.3f} | {v32:.3f} | {v32 - v1:+.3f} | {t1:.3f} | {t32:.3f} | {speed} |")
    lines += ["", "Decision: " + "; ".join(
        f"{m}: {'batch 32 as default' if ok else 'keep batch 1'}" for m, ok in verdict.items())]
    rows.append({"decision": verdict, "tolerance": TOLERANCE})
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
