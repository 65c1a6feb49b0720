"""Training speed and peak memory of MIL models versus bag size.

Each (model, bag size) pair runs in a fresh subprocess so its peak memory is its own:
peak resident memory on CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on GPU.
One training step = forward + backward + Adam update (built as training builds it: fused
where torch can) on one bag of N instances of D-dim features (one patient per step, as
MicroMIL trains). Each model's compute floor is timed beside it: the forward and weight
gradient of its first layer over all N instances (the (N, D) -> (N, P) projection every
model starts with; nothing else scales with N x D), and the step is reported as a multiple
of it (issue 22's target for MicroMIL: <= 1.2x).

    python benchmarks/speed_memory.py                        # full sweep, writes results/
    python benchmarks/speed_memory.py --sizes 100 1000 --steps 3
    python benchmarks/speed_memory.py --models transmil:attention=exact \\
        transmil:attention=nystrom --sizes 1000 4000 --out results/speed_memory_transmil

A model is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (its params for this sweep).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_model(spec: str) -> tuple[str, dict[str, str]]:
    """``"transmil:attention=exact,landmarks=128"`` -> ("transmil", {...})."""
    name, _, rest = spec.partition(":")
    params = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, params


def child(model_name: str, n: int, dim: int, steps: int, device: str, threads: int,
          params: dict | None = None) -> dict:
    import torch

    from micromil_core.models.registry import build_model
    from micromil_core.training.trainer import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(model_name, dim, 2, params).to(dev)
    opt = build_optimizer(model.parameters(), "adam", 1e-4, 0.0)  # as training builds it
    x = torch.randn(1, n, dim, device=dev)
    mask = torch.ones(1, n, dtype=torch.bool, device=dev)
    y = torch.tensor([1], device=dev)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = model.loss(x, mask, y)
        loss.backward()
        opt.step()

    model.train()
    step()  # warm-up (allocator, lazy init)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the floors' buffers
    floor = floor_seconds(model, x, steps)
    bare = floor_seconds(model, x, steps, preallocated=True)
    out = {
        "model": model_name,
        "instances": n,
        "dim": dim,
        "seconds_per_step": seconds,
        "steps_per_second": 1.0 / seconds,
        "floor_seconds": floor,
        "floor_ratio": seconds / floor,
        "floor_preallocated_seconds": bare,
        "floor_preallocated_ratio": seconds / bare,
        "peak_rss_mib": peak_rss,
        "rss_before_training_mib": rss_before,
        "device": device,
        "threads": threads,
        "params": params or {},
    }
    if dev.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def floor_seconds(model, x, steps: int, preallocated: bool = False) -> float:
    """Seconds of the model's first layer alone over the bag: y = x W^T (+ b) forward and the
    weight gradient dW = g^T x, as one training step needs them (no input gradient).

    ``preallocated``: the two products write into buffers made once, so the time is the
    multiply-adds alone, without the page faults of a fresh (N, P) output each step (the
    stricter floor: a step that reuses its buffers is judged against it too)."""
    import torch

    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.in_features == x.shape[-1])
    w = first.weight.detach().clone().requires_grad_(True)
    flat = x.reshape(-1, x.shape[-1])
    grad_out = torch.ones(flat.shape[0], w.shape[0], device=x.device)
    y_buf, dw_buf = torch.empty_like(grad_out), torch.empty_like(w)

    def once() -> None:
        if preallocated:
            torch.mm(flat, w.detach().t(), out=y_buf)
            torch.mm(grad_out.t(), flat, out=dw_buf)
            return
        w.grad = None
        torch.nn.functional.linear(flat, w).backward(grad_out)

    once()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        once()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["micromil", "gated-abmil"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000, 100000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "speed_memory"))
    ap.add_argument("--micromil-param", action="append", default=[], metavar="KEY=VALUE",
                    help="MicroMIL param for this sweep, e.g. proj_dim=512")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, params = parse_model(args.child[0])
        if name == "micromil":
            params.update(p.split("=", 1) for p in args.micromil_param)
        res = child(name, int(args.child[1]), args.dim, args.steps, args.device, args.threads,
                    params or None)
        res["model"] = args.child[0]
        print(json.dumps(res))
        return
    rows = []
    for n in args.sizes:
        for name in args.models:
            # Fewer timed steps for huge bags keeps the sweep within minutes on 2 cores.
            steps = max(1, args.steps if n < 100000 else 2)
            cmd = [sys.executable, __file__, "--child", name, str(n), "--dim", str(args.dim),
                   "--steps", str(steps), "--device", args.device, "--threads", str(args.threads)]
            for p in args.micromil_param:
                cmd += ["--micromil-param", p]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                row = {"model": name, "instances": n, "error": proc.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["model"], r["instances"]): r for r in rows}
    ratio_column = {"micromil", "gated-abmil"} <= set(args.models)
    lines = [
        f"# Training step speed and peak memory ({args.device}, {args.threads} threads, D={args.dim})",
        "",
        f"Machine: {platform.processor() or platform.machine()}; command: "
        f"`python benchmarks/speed_memory.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "| instances | "
        + " | ".join(f"{m} s/step | {m} / floor | {m} / preallocated floor | {m} peak MiB" for m in args.models)
        + (" | micromil / gated-abmil time |" if ratio_column else " |"),
        "|---" * (1 + 4 * len(args.models) + int(ratio_column)) + "|",
    ]
    for n in args.sizes:
        cells = []
        for m in args.models:
            r = by.get((m, n), {})
            if "error" in r or not r:
                cells += ["failed"] * 4
            else:
                mem = r.get("peak_cuda_mib", r["peak_rss_mib"])
                cells += [f"{r['seconds_per_step']:.4f}", f"{r['floor_ratio']:.2f}x",
                          f"{r['floor_preallocated_ratio']:.2f}x", f"{mem:.0f}"]
        a, b = by.get(("micromil", n), {}), by.get(("gated-abmil", n), {})
        ratio = (
            f"{a['seconds_per_step'] / b['seconds_per_step']:.2f}x"
            if "seconds_per_step" in a and "seconds_per_step" in b
            else "-"
        )
        lines.append(f"| {n} | " + " | ".join(cells) + (f" | {ratio} |" if ratio_column else " |"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
