"""What a deployed round costs beyond the sites' own compute, against ``micromil simulate``.

One experiment, run three ways on this machine, each measured per round:
- deployed, ``supernode.isolation: process`` (the default): a SuperLink with TLS and node
  authentication (``flower-server start``) and 2 hospitals (``flower-client run``) on
  loopback, each with its one warm ClientApp process (client.worker);
- deployed, ``supernode.isolation: subprocess``: Flower's default, a fresh ClientApp
  process per message (what a round cost before client.worker);
- simulated: ``micromil simulate`` on the same data root and experiment.

A hospital's compute in a round is what its worker logs for the train and the evaluate
message ("... handled in X s"); a round waits for the slower hospital in each exchange,
so compute = max over sites of train + max over sites of evaluate, and the overhead is
the round's wall time minus that (messaging, serialisation, Flower's polling). Data:
2 training sites of synthetic bags (timing only, not accuracy), by default 200 patients x
1,000 instances x 1,024-d each (issue 22's size). Targets: deployed round <= 1.5x the
simulated round and overhead/compute <= 0.5, on rounds 2+.

    python benchmarks/deployment_overhead.py --work /tmp/deploy-bench
    python benchmarks/deployment_overhead.py --work /tmp/small --patients 40 --instances 200 \\
        --dim 256 --out benchmarks/results/deployment_overhead_small
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from federation import write_results  # noqa: E402

BIN = Path(sys.executable).parent
SITES = ("site-0", "site-1")
HANDLED = re.compile(r"micromil\.worker: (\w+) message of run \d+ handled in ([\d.]+) s")


def make_data(root: Path, patients: int, instances: int, dim: int, seed: int = 0) -> Path:
    """Two training sites of synthetic bags: positives carry 10 % shifted instances."""
    import torch

    if (root / "sites.yaml").is_file():
        return root
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for site in SITES:
        folder = root / site / "features"
        folder.mkdir(parents=True)
        rows = ["patient_id,label,split"]
        for i in range(patients):
            label = i % 2
            bag = torch.randn(instances, dim, generator=gen)
            if label:
                bag[: instances // 10] += 0.5
            pid = f"{site}-p{i:04d}"
            torch.save(bag, folder / f"{pid}.pt")
            rows.append(f"{pid},{'positive' if label else 'negative'},{'test' if i % 5 == 4 else 'train'}")
        (root / site / "patients.csv").write_text("\n".join(rows) + "\n")
        entries.append({"name": site, "role": "train", "path": site, "n_patients": patients})
    (root / "sites.yaml").write_text(yaml.safe_dump({
        "format_version": 1, "dataset": "synthetic-timing", "classes": ["negative", "positive"],
        "feature_dim": dim, "modality": "features", "sites": entries,
    }, sort_keys=False))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timestamped(cmd: list, path: Path) -> subprocess.Popen:
    """Start ``cmd``; each line of its output goes to ``path`` led by the Unix time it came."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def copy():
        with open(path, "w") as fh:
            for raw in proc.stdout:
                fh.write(f"{time.time():.3f} {raw.decode(errors='replace')}")
                fh.flush()

    threading.Thread(target=copy, daemon=True).start()
    return proc


def _rounds(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())["rounds"]


def deployed(work: Path, data: Path, experiment: dict, isolation: str) -> dict:
    """``flower-server start`` + one ``flower-client run`` per site, TLS and node auth."""
    root = work / f"deployed-{isolation}"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    pki = root / "pki"
    subprocess.run([BIN / "flower-server", "provision", "--out", str(pki), "--server-name", "localhost",
                    "--sites", *SITES], check=True, capture_output=True, timeout=120)
    (root / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    port = _free_port()
    (root / "federation.yaml").write_text(yaml.safe_dump({
        "experiment": "experiment.yaml", "state_dir": "state",
        "superlink": {"host": "127.0.0.1", "port": port, "ca_cert": str(pki / "coordinator/ca.pem"),
                      "cert": str(pki / "coordinator/server.pem"), "key": str(pki / "coordinator/server.key"),
                      "registered_keys": str(pki / "coordinator/registered")},
        "run": {"out_dir": "run", "expected_sites": len(SITES), "wait_for_sites": 600},
    }))
    procs = []
    start = time.perf_counter()
    server = subprocess.Popen([BIN / "flower-server", "start", "--config", str(root / "federation.yaml")],
                              stdout=open(root / "server.out", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "submitted" not in (root / "server.out").read_text(errors="replace"):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the run was not submitted:\n" + (root / "server.out").read_text())
            time.sleep(0.5)
        for site in SITES:
            config = root / f"{site}.yaml"
            config.write_text(yaml.safe_dump({
                "site": {"name": site, "data_path": str(data / site), "role": "train"},
                "superlink": {"address": f"localhost:{port}", "ca_cert": str(pki / f"sites/{site}/ca.pem"),
                              "private_key": str(pki / f"sites/{site}/{site}.key")},
                "supernode": {"port": _free_port(), "state_dir": str(root / f"state-{site}"),
                              "isolation": isolation},
            }))
            procs.append(_timestamped([BIN / "flower-client", "run", "--config", str(config)],
                                      root / f"{site}.out"))
        if server.wait(timeout=3600) != 0:
            raise RuntimeError("the coordinator failed:\n" + (root / "server.out").read_text()[-3000:])
        total = time.perf_counter() - start
    finally:
        subprocess.run([BIN / "flower-server", "stop", "--config", str(root / "federation.yaml")],
                       capture_output=True, timeout=120)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    rounds = _rounds(root / "run")
    result = {"mode": f"deployed, isolation {isolation}", "total_s": round(total, 1),
              "round_wall_s": [round(r["wall_seconds"], 2) for r in rounds]}
    if isolation == "process":
        result.update(_compute_per_round(root, len(rounds)))
    return result


def _compute_per_round(root: Path, n_rounds: int) -> dict:
    """Each round's compute from the workers' logs: slowest train + slowest evaluate."""
    train = [[0.0] * n_rounds for _ in SITES]
    evaluate = [[0.0] * n_rounds for _ in SITES]
    for s, site in enumerate(SITES):
        handled = HANDLED.findall((root / f"{site}.out").read_text(errors="replace"))
        kinds = [k for k, _ in handled]
        assert kinds[0] == "query" and kinds[1:] == ["train", "evaluate"] * n_rounds, kinds
        for r in range(n_rounds):
            train[s][r] = float(handled[1 + 2 * r][1])
            evaluate[s][r] = float(handled[2 + 2 * r][1])
    compute = [max(t[r] for t in train) + max(e[r] for e in evaluate) for r in range(n_rounds)]
    return {"compute_s": [round(c, 2) for c in compute],
            "train_s": [round(max(t[r] for t in train), 2) for r in range(n_rounds)],
            "evaluate_s": [round(max(e[r] for e in evaluate), 2) for r in range(n_rounds)]}


def simulated(work: Path, data: Path, experiment: dict) -> dict:
    out = work / "simulated"
    config = work / "simulate.yaml"
    config.write_text(yaml.safe_dump({**experiment, "simulation": {"data_root": str(data)}}))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "micromil_core.cli", "simulate", "--config", str(config),
                    "--out", str(out), "--overwrite"], check=True, stdout=subprocess.DEVNULL, timeout=3600)
    total = time.perf_counter() - start
    rounds = _rounds(out)
    return {"mode": "micromil simulate", "total_s": round(total, 1),
            "round_wall_s": [round(r["wall_seconds"], 2) for r in rounds]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/deploy-bench")
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="micromil")
    ap.add_argument("--modes", nargs="+", default=["process", "simulate", "subprocess"],
                    choices=["process", "simulate", "subprocess"])
    ap.add_argument("--out", default=str(HERE / "results" / "deployment_overhead"))
    args = ap.parse_args()

    work = Path(args.work)
    data = make_data(work / "data", args.patients, args.instances, args.dim)
    experiment = {
        "model": {"name": args.model},
        "train": {"seed": 0, "num_threads": 1},  # 2 hospitals on 2 cores: one each
        "federation": {"rounds": args.rounds, "local_epochs": 1, "min_train_sites": len(SITES)},
    }
    results = {}
    for mode in args.modes:
        print(f"running {mode} ...", flush=True)
        results[mode] = simulated(work, data, experiment) if mode == "simulate" else \
            deployed(work, data, experiment, mode)
    write_results(args.out, [{"args": vars(args), **r} for r in results.values()],
                  _table(args, results))


def _later(values: list[float]) -> float:
    """Median over rounds 2+ (round 1 includes loading and first-touch costs)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def _table(args, results: dict) -> list[str]:
    lines = [
        f"# Deployed vs simulated rounds: {len(SITES)} hospitals x {args.patients} patients x "
        f"{args.instances} instances x {args.dim}-d, {args.model}, {args.rounds} rounds",
        "",
        f"Command: `python benchmarks/deployment_overhead.py --work {args.work} --patients {args.patients} "
        f"--instances {args.instances} --dim {args.dim} --rounds {args.rounds} --model {args.model}`",
        "",
        "Medians over rounds 2+, seconds, one run on this 2-core machine (synthetic bags: timing only).",
        "",
        "| mode | round wall | site compute | overhead | overhead / compute | round / simulated | run total |",
        "|---|---|---|---|---|---|---|",
    ]
    sim = _later(results["simulate"]["round_wall_s"]) if "simulate" in results else None
    for r in results.values():
        wall = _later(r["round_wall_s"])
        compute = _later(r["compute_s"]) if "compute_s" in r else None
        over = None if compute is None else _later([w - c for w, c in zip(r["round_wall_s"], r["compute_s"], strict=True)])
        cells = [r["mode"], f"{wall:.2f}", "" if compute is None else f"{compute:.2f}",
                 "" if over is None else f"{over:.2f}", "" if over is None else f"{over / compute:.2f}",
                 "" if sim is None else f"{wall / sim:.2f}x", f"{r['total_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per round (wall s): " + "; ".join(
        f"{r['mode']}: {', '.join(str(w) for w in r['round_wall_s'])}" for r in results.values())]
    if "process" in results:
        r = results["process"]
        lines.append(f"Deployed (process) per round: train {r['train_s']}, evaluate {r['evaluate_s']} "
                     "(slowest site each)")
    return lines


if __name__ == "__main__":
    main()
