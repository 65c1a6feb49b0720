"""Start-up and wall time of `micromil simulate`, Flower's supported path (a private SuperLink
and `flwr run`) against the deprecated in-process `run_simulation`, on the same experiment.

Each engine runs the command ``--repeats`` times, alternating; a mark is the time from the
command's start to the first console line that says it (pre-flight passed, sites
discovered = start-up, round 1 and the last round done, exit).

    python benchmarks/simulation_startup.py --data-root data/ucsb --rounds 3
    python benchmarks/simulation_startup.py --data-root data/ucsb --set model.params.gnn_backend=pyg
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ("in-process", "superlink")
MARKS = {"pre-flight passed": "pre-flight", "sites: train": "start-up (sites discovered)",
         "round 1/": "round 1 done", "held-out sites, round": "results printed"}


def one_run(engine: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [str(Path(sys.executable).with_name("micromil")), "simulate", "--data-root", args.data_root,
           "--model", args.model, "--set", f"federation.rounds={args.rounds}",
           "--set", "train.num_threads=1", "--set", f"simulation.engine={engine}", "--out", str(out)]
    for override in args.overrides:
        cmd += ["--set", override]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks: dict[str, float] = {}
    for line in proc.stdout:
        for key, name in MARKS.items():
            if key in line and name not in marks:
                marks[name] = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"{engine}: micromil simulate failed")
    marks["exit"] = time.perf_counter() - start
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--model", default="micromil")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to every run's `micromil simulate` (repeatable)")
    ap.add_argument("--out", default=str(HERE / "results" / "simulation_startup"))
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {e: [] for e in ENGINES}
    work = Path(tempfile.mkdtemp(prefix="sim-startup-"))
    try:
        for i in range(args.repeats):
            for engine in ENGINES:
                runs[engine].append(one_run(engine, args, work / f"{engine}-{i}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = [*MARKS.values(), "exit"]
    med = {e: {n: statistics.median(r[n] for r in runs[e]) for n in names} for e in ENGINES}
    sets = "".join(f" --set {o}" for o in args.overrides)
    lines = [
        "# `micromil simulate` start-up: Flower's supported path vs in-process run_simulation",
        "",
        f"Command: `python benchmarks/simulation_startup.py --data-root {args.data_root} "
        f"--model {args.model} --rounds {args.rounds} --repeats {args.repeats}{sets} --out {args.out}`",
        "",
        f"Seconds from the command's start, median of {args.repeats} alternating runs each; "
        f"{args.model}, {args.rounds} rounds, one torch thread per site"
        + (f", {', '.join(args.overrides)}." if args.overrides else "."),
        "",
        "| mark | " + " | ".join(ENGINES) + " | superlink - in-process |",
        "|---|" + "---:|" * (len(ENGINES) + 1),
    ]
    for n in names:
        a, b = med["in-process"][n], med["superlink"][n]
        lines.append(f"| {n} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "median": med}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
