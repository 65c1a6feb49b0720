"""A hostile hospital in the demo federation: each fault refused, named, nothing lost.

README's demo split of the real UCSB breast TMA data (3 training sites + 1 held out,
Dirichlet(0.5), seed 1), federated MicroMIL. One training site (site-1) sends a
different broken training reply in each round (tests/hostile.py: NaN, Inf, wrong shape,
missing array, extra array, wrong dtype, a 1e6x-boosted update, a claimed billion
patients), an impossible evaluation AUC in round 1, and no evaluation reply in the last
round. The same federation runs once with every site honest. Reported: each fault's
round, whether it was refused and the reason the coordinator logged, the rounds completed,
whether the global model stayed finite, the held-out AUC of both runs, the honest sites'
update norms against federation.max_update_ratio, and what the small-count guard withheld.

    .venv/bin/python benchmarks/reply_faults.py --work /tmp/faults     # ~1.5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.hostile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/reply-faults")
    ap.add_argument("--out", default=str(HERE / "results" / "reply_faults"))
    args = ap.parse_args()

    import torch

    from micromil_core.cli import main as micromil
    from micromil_core.config import build_config
    from micromil_core.io import write_json_atomic, write_text_atomic
    from micromil_core.training.checkpoint import load_checkpoint
    from server.simulation import simulate
    from tests.hostile import FAULTS, HostileGrid

    work = Path(args.work)
    data = work / "data" / "ucsb"
    if not (data / "sites.yaml").is_file():
        assert micromil(["datasets", "prepare", "ucsb-breast", "--out", str(data), "--sites", "3",
                         "--holdout-sites", "1", "--partition", "dirichlet:0.5", "--seed", "1"]) == 0
    rounds = len(FAULTS) + 1
    cfg = build_config({
        "model": {"name": "micromil"},
        "train": {"lr": 5e-4, "seed": 0, "num_threads": 1},
        "federation": {"rounds": rounds, "local_epochs": 1},
        "simulation": {"data_root": str(data)},
    })
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("micromil.server").addHandler(handler)

    grids: list[HostileGrid] = []

    def tap(site: str, **faults):
        def wrap(grid):
            grids.append(HostileGrid(grid, site, **faults))
            return grids[-1]

        return wrap

    runs = {}
    hostile_tap = tap("site-1", eval_fault_round=1, drop_eval_round=rounds)
    for name, grid_tap in (("hostile", hostile_tap), ("honest", tap("no-such-site"))):
        out = work / name
        metrics = simulate(cfg, out, resume=False, grid_tap=grid_tap) if not (out / "model.pt").exists() \
            else json.loads((out / "metrics.json").read_text())
        state = load_checkpoint(out / "model.pt").state_dict
        history = json.loads((out / "history.json").read_text())["rounds"]
        runs[name] = {
            "heldout_auc": metrics.get("auc"),
            "rounds_completed": len(history),
            "model_finite": all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()),
            "history": history,
        }
    hostile = runs["hostile"]["history"]
    rows = []
    for rnd, fault in enumerate(FAULTS, start=1):
        why = hostile[rnd - 1]["rejected"]["train"].get("site-1")
        logged = any(w.startswith(f"round {rnd}: site-1: training reply rejected") for w in warnings)
        rows.append({"round": rnd, "fault": fault, "refused": why is not None, "logged_by_name": logged,
                     "aggregated": sorted(hostile[rnd - 1]["train"]), "reason": why})
    eval_reason = hostile[0]["rejected"]["evaluate"].get("site-1")
    lost_eval = any(w.startswith(f"round {rounds}: site-1: no evaluation reply") for w in warnings)
    ratios = [r for g in grids for r in g.honest_ratios]
    suppressed = {
        site: m.get("suppressed", []) for site, m in runs["honest"]["history"][0]["evaluate"].items()
    }
    bound = cfg.federation.max_update_ratio
    summary = {
        "faults": rows, "evaluate_auc_7": eval_reason, "lost_evaluation_logged": lost_eval,
        "honest_update_ratio_max": max(ratios) if ratios else None, "max_update_ratio": bound,
        **{f"{k}_{name}": runs[name][k] for name in runs for k in ("heldout_auc", "rounds_completed", "model_finite")},
        "suppressed_round1": suppressed,
    }
    write_json_atomic(Path(args.out + ".json"), summary)
    lines = [
        "# A hostile hospital in the demo federation",
        "",
        f"Command: `.venv/bin/python benchmarks/reply_faults.py --work {args.work}`. README's demo split",
        "(UCSB breast TMA, 3 training sites + 1 held out, Dirichlet(0.5), seed 1), federated MicroMIL,",
        f"{rounds} rounds; site-1 sends fault r in round r (tests/hostile.py).",
        "",
        "| round | fault | refused | named in the coordinator's log | aggregated | reason logged |",
        "|---:|---|---|---|---|---|",
        *[f"| {r['round']} | {r['fault']} | {'yes' if r['refused'] else 'NO'} | "
          f"{'yes' if r['logged_by_name'] else 'NO'} | {', '.join(r['aggregated'])} | {r['reason']} |" for r in rows],
        "",
        f"- Evaluation reply claiming AUC 7 (round 1): {'refused: ' + eval_reason if eval_reason else 'NOT refused'}.",
        f"- Evaluation reply lost in round {rounds}: {'named in the log' if lost_eval else 'NOT logged'}.",
        f"- Rounds completed: hostile run {runs['hostile']['rounds_completed']}, honest run "
        f"{runs['honest']['rounds_completed']} of {rounds}; global model finite: "
        f"{runs['hostile']['model_finite']} / {runs['honest']['model_finite']}.",
        f"- Held-out AUC (site-3, 19 patients): hostile run {runs['hostile']['heldout_auc']:.3f}, honest run "
        f"{runs['honest']['heldout_auc']:.3f} (the hostile run trains on 2 sites in most rounds).",
        f"- Honest sites' update norm / global model norm: at most {summary['honest_update_ratio_max']:.4f} over "
        f"{len(ratios)} updates, against the default bound federation.max_update_ratio = {bound:g}.",
        "- Small-count guard, honest run round 1, metrics withheld per site (n < 5): "
        + "; ".join(f"{s}: {len(v)}" for s, v in suppressed.items()) + ".",
        "",
    ]
    write_text_atomic(Path(args.out + ".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
