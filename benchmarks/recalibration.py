"""Does recalibrating a federated model at its held-out hospital help, and what does it
cost? Per seed: fit ``micromil calibrate`` on the held-out hospital's VALIDATION patients,
then judge the original and the recalibrated model on its TEST patients (never used for
the fit).

    python benchmarks/recalibration.py --runs '/tmp/fedm/fashion-micromil-seed{seed}' \
        --seeds 0 1 2 3 4 5 6 --holdout /tmp/fedm/data/fashion/site-5

The runs are finished federations (benchmarks/federated_models.py writes them); the
held-out site must have a split column with val and test patients.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import write_results  # noqa: E402

from micromil_core.training.score import calibrate_checkpoint, evaluate_checkpoint

KEYS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")


def one_seed(run: Path, holdout: Path, method: str, work: Path) -> dict:
    recal = work / "calibrated.pt"
    fit = calibrate_checkpoint(run / "model.pt", [holdout], recal, method=method, split="val")
    row: dict = {"run": str(run), "fit_patients": fit["n"], "params": fit["params"]}
    for name, model in (("original", run / "model.pt"), ("recalibrated", recal)):
        m = evaluate_checkpoint(model, [holdout], work / name, split="test")
        row[name] = {
            **{k: m[k] for k in KEYS},
            "brier": m["calibration"]["brier"],
            "ece": m["calibration"]["ece"],
            "n": m["n"],
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="federated run folder; {seed} is replaced")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--holdout", required=True, help="the held-out site folder")
    ap.add_argument("--method", choices=["platt", "temperature"], default="platt")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "recalibration"))
    args = ap.parse_args()

    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            row = one_seed(Path(args.runs.format(seed=seed)), Path(args.holdout), args.method, Path(tmp))
        rows.append({"seed": seed, **row})

    cols = (*KEYS, "brier", "ece")
    lines = [
        f"# Recalibrating the federated model at its held-out hospital ({args.method})",
        "",
        f"Fitted on the held-out site's val patients ({rows[0]['fit_patients']}), judged on its "
        f"test patients ({rows[0]['original']['n']}); seeds {', '.join(map(str, args.seeds))}; "
        f"mean ± sd over seeds. Command: `python benchmarks/recalibration.py --runs "
        f"'{args.runs}' --seeds {' '.join(map(str, args.seeds))} --holdout {args.holdout}`",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name in ("original", "recalibrated"):
        cells = []
        for k in cols:
            v = np.array([r[name][k] for r in rows], dtype=float)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
