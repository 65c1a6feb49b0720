"""Many simulated hospitals on one machine: does a 2-round federation of N sites finish, how
much memory does it hold, and how long does a round take?

For each N, a Fashion-MNIST bag root of N sites (90 % training, 10 % held out, Dirichlet(0.5)
label skew) is prepared once; ``micromil simulate`` then runs 2 FedAvg rounds of gated ABMIL
on it in a subprocess. Memory is the peak, over the run, of the summed proportional set size
(PSS, /proc/<pid>/smaps_rollup) of the whole process tree: the coordinator, Ray's own
processes and the simulated sites' workers, so shared pages count once. Target (issue 22):
100 sites complete 2 rounds within 4 GiB on this 2-core machine.

    python benchmarks/many_sites.py --work /tmp/many            # writes results/many_sites.*
    python benchmarks/many_sites.py --work /tmp/many --sites 10 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from federation import micromil, write_results  # noqa: E402

DATASET = "fashion-bags:standard/0"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_with_peak_pss(cmd: list[str]) -> tuple[int, float]:
    """Run ``cmd``; returns (peak summed PSS of its process tree in KiB, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return peak, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--out", default=str(HERE / "results" / "many_sites"))
    args = ap.parse_args()
    rows = []
    for n in args.sites:
        data = Path(args.work) / f"fashion-{n}"
        holdout = max(1, n // 10)
        if not (data / "sites.yaml").is_file():
            micromil("datasets", "prepare", DATASET, "--out", str(data), "--sites", str(n - holdout),
                     "--holdout-sites", str(holdout), "--partition", "dirichlet:0.5", "--seed", "0")
        out = Path(args.work) / f"run-{n}"
        cmd = [sys.executable, "-m", "micromil_core.cli", "simulate", "--data-root", str(data),
               "--model", "gated-abmil", "--rounds", "2", "--encoder", "histo-texture",
               "--set", "train.num_threads=1", "--out", str(out), "--overwrite"]
        peak, wall = run_with_peak_pss(cmd)
        history = json.loads((out / "history.json").read_text())["rounds"]
        rows.append({
            "sites": n, "holdout_sites": holdout, "rounds": len(history), "peak_pss_gib": peak / 2**20,
            "wall_s": wall, "round_s": [r["wall_seconds"] for r in history],
            "failures": sum(len(r["failures"]) for r in history),
        })
    lines = [
        "# Many simulated hospitals on one machine: 2 rounds, peak memory, round time",
        "",
        "Command: `" + " ".join(["python benchmarks/many_sites.py", *sys.argv[1:]]) + "`",
        "",
        f"{DATASET} partitioned over N sites (10 % held out, Dirichlet(0.5)), gated ABMIL, FedAvg, "
        "2 rounds, histo-texture features (extracted in the pre-flight, then cached), one torch "
        "thread per site. Peak PSS: summed over the simulate process and all its descendants "
        "(Ray and the site workers). Target: 100 sites within 4 GiB.",
        "",
        "| sites | rounds done | failures | peak PSS (GiB) | round 1 (s) | round 2 (s) | whole command (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rounds = r["round_s"] + [float("nan")] * (2 - len(r["round_s"]))
        lines.append(f"| {r['sites']} | {r['rounds']} | {r['failures']} | {r['peak_pss_gib']:.2f} | "
                     f"{rounds[0]:.1f} | {rounds[1]:.1f} | {r['wall_s']:.0f} |")
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
