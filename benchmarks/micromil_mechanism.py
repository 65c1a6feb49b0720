"""Does MicroMIL's mechanism work? Variant by variant, on real data (issue 19).

For each MicroMIL variant (configs/micromil/<name>.yaml, or `micromil` = today's defaults)
and each dataset: accuracy and AUC on test folds, paired against gated ABMIL and mean-pool
(corrected resampled t-test on CV folds; paired by seed on fashion-sparse); the diversity
of its representatives (distinct / min(N, K)) on validation and test bags; on
fashion-sparse the witness recall (share of positive test bags in which at least one dress,
the instance that makes the bag positive, is among the representatives; ABMIL's top-K
attention instances beside it); and seconds per training step at 10,000 instances,
released and the others timed in one run.

This script reads runs; it trains nothing. Make them first (as for the committed results):

    .venv/bin/python benchmarks/cv_table.py --datasets musk1 musk2 ucsb-breast --repeats 5 \\
        --models micromil/distinct-instances micromil/released gated-abmil mean-pool --work W
    .venv/bin/python benchmarks/cv_table.py --datasets musk1 musk2 ucsb-breast --repeats 1 \\
        --models micromil/distinct micromil/distinct-sharp ... --work W     # other candidates
    .venv/bin/python benchmarks/sparse_bags.py --work S --seeds 0 1 2 3 4 --compare \\
        --models micromil/distinct-instances micromil/released gated-abmil mean-pool abmil
    .venv/bin/python benchmarks/micromil_mechanism.py --cv-work W --sparse-work S \\
        --variants micromil/distinct ... micromil/distinct-instances micromil/released \\
        --chosen micromil/distinct-instances --out benchmarks/results/micromil_mechanism

The last variant is the reference of the paired rows and of the step-cost ratio.
Selection (configs/micromil/README.md) reads only the `validation` columns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv_table import combine, paired_table  # noqa: E402
from federation import paired_by_seed, spread, variant_params, write_results  # noqa: E402

CV_DATASETS = ("musk1", "musk2", "ucsb-breast")
BASELINES = ("gated-abmil", "mean-pool")


def run_name(model: str) -> str:
    return model.replace("/", "_")


def cv_runs(work: Path, dataset: str, model: str) -> list[dict]:
    """metrics.json of every finished CV repeat of (dataset, model), with its seed."""
    rows = []
    for path in sorted((work / "runs").glob(f"{dataset}-{run_name(model)}-seed*/metrics.json")):
        seed = int(path.parent.name.rsplit("-seed", 1)[1])
        timing = path.parent / "bench-seconds.json"  # written by cv_table.py
        seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")
        rows.append({**json.loads(path.read_text()), "dataset": dataset, "model": model, "seed": seed,
                     "seconds": seconds})
    return rows


def diversity_cell(div: dict | None) -> str:
    if not div:
        return "-"
    cell = f"{div['mean']:.2f} / {div['median']:.2f} / {div['single_fraction']:.2f}"
    return cell + (f" / {div['cluster_coverage']:.2f}" if div.get("cluster_coverage") is not None else "")


def pooled_diversity(divs: list[dict]) -> dict | None:
    """Mean over repeats of each diversity figure (each repeat already pools its bags)."""
    divs = [d for d in divs if d]
    if not divs:
        return None
    keys = ["mean", "median", "single_fraction"]
    if all("cluster_coverage" in d for d in divs):
        keys.append("cluster_coverage")
    return {k: float(np.mean([d[k] for d in divs])) for k in keys}


def sparse_witnesses(site: Path, max_bags: int, data_seed: int) -> dict[str, np.ndarray]:
    """patient id -> (N,) bool, True where the instance (in feature order) is a witness.

    fashion-sparse records no instance labels; its bags are rebuilt here from the same
    seed, and the first bag's first image is compared with the written PNG, so a change in
    how bags are made fails loudly instead of scoring the wrong instances.
    """
    from micromil_core.data import datasets as ds
    from micromil_core.data.layout import list_patient_images
    from micromil_core.encoders.images import read_image

    rng = np.random.default_rng(data_seed)
    images, labels = ds._labelled_fashion_images(ds.FASHION_MNIST_DIR)
    target = ds.parse_sparse_target(ds.SPARSE_NAME)
    bags = ds.make_fashion_sparse_bags(max_bags, labels, rng, target)
    out = {}
    for i, bag in enumerate(bags):
        files = list_patient_images(site, bag.pid)
        rows = bag.image_rows[[int(f.stem) for f in files]]  # feature order = sorted file names
        if i == 0 and not np.array_equal(read_image(files[0])[..., 0], images[bag.pool][rows[0]]):
            raise SystemExit(f"{site}: rebuilt bags do not match the written images; "
                             "pass the --max-bags / --data-seed the data was prepared with")
        out[bag.pid] = labels[bag.pool][rows] == target
    return out


def chance_recall(n: int, witnesses: int, shown: int) -> float:
    """P(at least one witness among ``shown`` distinct instances drawn at random from ``n``)."""
    from math import comb

    return 1.0 - comb(n - witnesses, shown) / comb(n, shown)


def _loaded(run: Path, site: Path):
    """(loaded checkpoint and site, the model in eval mode, the site's bags) of one run."""
    from micromil_core.training.score import load_checkpoint_and_sites

    loaded = load_checkpoint_and_sites(run / "model.pt", [site], "cpu", None, False, True)
    (sb,) = loaded.sites
    return loaded, loaded.model.eval(), sb


def _split_diversity(loaded, model, sb, part: str) -> dict | None:
    """Representative diversity of the model on one split (val | test) of the site."""
    from micromil_core.training.mechanism import representative_diversity, representative_picks

    picks = representative_picks(model, loaded.model_inputs(sb, sb.by_split(part)), loaded.device)
    return representative_diversity(picks) if picks else None


def sparse_validation_diversity(run: Path, site: Path) -> dict | None:
    """Diversity on the validation bags only: what the choice of default may read."""
    loaded, model, sb = _loaded(run, site)
    return _split_diversity(loaded, model, sb, "val")


def sparse_mechanism(run: Path, site: Path, witnesses: dict[str, np.ndarray], top_k: int) -> dict:
    """Diversity (val, test) and, on positive test bags, where the witnesses are: recall
    (a witness among the shown instances), the chance of that for as many distinct
    instances drawn at random, and the top-1 hit rate (the highest-scored shown instance
    is a witness). Shown = MicroMIL's distinct representatives, or the top-``top_k``
    attention instances of an attention model."""
    from micromil_core.data.bag import collate_bags

    loaded, model, sb = _loaded(run, site)
    out: dict = {f"{part}_diversity": _split_diversity(loaded, model, sb, part) for part in ("val", "test")}
    hits, chance, top1 = [], [], []
    test = [b for b in sb.by_split("test") if b.label == 1]
    for bag in loaded.model_inputs(sb, test):
        pred = model.predict_batch(collate_bags([bag]))
        if pred.instance_scores is None:
            return out
        scores = pred.instance_scores[0, : bag.num_instances]
        if pred.selected is not None:
            shown = sorted({int(i) for i in pred.selected[0] if int(i) >= 0}, key=lambda i: -float(scores[i]))
        else:
            shown = scores.argsort(descending=True)[:top_k].tolist()
        wit = witnesses[bag.patient_id]
        hits.append(bool(wit[shown].any()))
        chance.append(chance_recall(len(wit), int(wit.sum()), len(shown)))
        top1.append(bool(wit[shown[0]]))
    out["witness_recall"] = float(np.mean(hits)) if hits else float("nan")
    out["witness_recall_chance"] = float(np.mean(chance)) if chance else float("nan")
    out["witness_top1"] = float(np.mean(top1)) if top1 else float("nan")
    out["witness_bags"] = len(hits)
    return out


def step_seconds(variants: list[str], n: int, dim: int, rounds: int) -> dict[str, float]:
    """Median seconds per training step (forward, backward, Adam) of each variant on one bag
    of ``n`` instances, interleaved round by round so they share the machine's state."""
    from speed_memory import child

    params = {v: variant_params(v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v].append(child("micromil", n, dim, 2, "cpu", torch.get_num_threads(), params[v])["seconds_per_step"])
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cv-work", help="--work of the cv_table.py runs")
    ap.add_argument("--sparse-work", help="--work of the sparse_bags.py runs")
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--baselines", nargs="*", default=list(BASELINES))
    ap.add_argument("--chosen", help="the variant paired against the baselines (default: every variant)")
    ap.add_argument("--witness-model", default="abmil", help="attention model whose top-K is compared")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--max-bags", type=int, default=500)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--step-instances", type=int, default=10_000)
    ap.add_argument("--step-dim", type=int, default=708, help="UCSB's feature width")
    ap.add_argument("--step-rounds", type=int, default=3, help="0 skips the timing")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows: list[dict] = []
    lines = ["# MicroMIL's mechanism by variant (issue 19)", "",
             f"Command: `python benchmarks/micromil_mechanism.py {' '.join(sys.argv[1:])}`", "",
             "Diversity = distinct representatives / min(N, K) per bag, shown as mean / median / "
             "share of bags whose picks are ONE instance / cluster coverage (per bag, the share of "
             "clusters owning an instance whose representative is one of their own members; shown "
             "where the runs recorded it). `validation` columns come from the selection splits "
             "only (what the default was chosen on); the rest from test folds.", ""]
    if args.cv_work:
        work = Path(args.cv_work)
        lines += ["## Classic MIL benchmarks: 10-fold CV, same folds for every model", "",
                  "| dataset | model | repeats | accuracy | AUC | validation AUC | validation diversity | test diversity |",
                  "|---|---|---|---|---|---|---|---|"]
        pairs = []
        all_runs = []
        for d in CV_DATASETS:
            for m in [*args.variants, *args.baselines]:
                runs = cv_runs(work, d, m)
                if not runs:
                    continue
                all_runs += runs
                c = combine(runs)
                val_auc = [r["validation"]["auc_mean"] for r in runs if r.get("validation")]
                val_div = pooled_diversity([r.get("validation", {}).get("representative_diversity") for r in runs])
                test_div = pooled_diversity([r.get("representative_diversity") for r in runs])
                rows.append({"dataset": d, "model": m, "repeats": len(runs), **c,
                             "validation_auc": float(np.mean(val_auc)) if val_auc else None,
                             "validation_diversity": val_div, "test_diversity": test_div})
                lines.append(f"| {d} | {m} | {len(runs)} | {c['accuracy_mean']:.3f} | {c['auc_mean']:.3f} | "
                             f"{np.mean(val_auc):.3f} | {diversity_cell(val_div)} | {diversity_cell(test_div)} |"
                             if val_auc else
                             f"| {d} | {m} | {len(runs)} | {c['accuracy_mean']:.3f} | {c['auc_mean']:.3f} | - | - | - |")
        for v in [args.chosen] if args.chosen else args.variants:
            pairs += [f"{b}:{v}" for b in args.baselines]
        if len(args.variants) > 1:
            pairs += [f"{args.variants[-1]}:{v}" for v in args.variants[:-1]]
        present = sorted({r["dataset"] for r in all_runs}, key=CV_DATASETS.index)
        lines += ["", "Paired on the same folds (corrected resampled t-test, Nadeau and Bengio 2003):", "",
                  *paired_table(all_runs, present, pairs, args.folds)]
    if args.sparse_work:
        work = Path(args.sparse_work)
        site = work / "data" / "site-0"
        witnesses = sparse_witnesses(site, args.max_bags, args.data_seed)
        k = 36
        sparse_rows = []
        for m in [*args.variants, *args.baselines, args.witness_model]:
            for path in sorted((work / "runs").glob(f"{m}-seed*/metrics.json")):
                seed = int(path.parent.name.rsplit("-seed", 1)[1])
                metrics = json.loads(path.read_text())
                row = {"model": m, "seed": seed, "test": metrics["test"], "validation": metrics["validation"]}
                row.update(sparse_mechanism(path.parent, site, witnesses, k))
                sparse_rows.append(row)
        lines += ["", "## fashion-sparse: 40-80 images per bag, 1-4 witnesses (sparse_bags.py protocol)", "",
                  "| model | seeds | test AUC | accuracy | validation AUC | validation diversity | test diversity "
                  f"| witness recall (representatives, or top-{k} attention) | recall by chance, as many "
                  "random instances | top-1 is a witness |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in dict.fromkeys([*args.variants, *args.baselines, args.witness_model]):
            ok = [r for r in sparse_rows if r["model"] == m]
            if not ok:
                continue
            vd = pooled_diversity([r.get("val_diversity") for r in ok])
            td = pooled_diversity([r.get("test_diversity") for r in ok])

            def col(key: str, ok=ok) -> str:
                vals = [r[key] for r in ok if key in r]
                return spread(vals) if vals else "-"

            lines.append(f"| {m} | {len(ok)} | {spread([r['test']['auc'] for r in ok])} | "
                         f"{spread([r['test']['accuracy'] for r in ok])} | "
                         f"{spread([r['validation']['auc'] for r in ok])} | {diversity_cell(vd)} | "
                         f"{diversity_cell(td)} | {col('witness_recall')} | {col('witness_recall_chance')} | "
                         f"{col('witness_top1')} |")
        pairs = [f"{b}:{v}" for v in ([args.chosen] if args.chosen else args.variants) for b in args.baselines]
        if len(args.variants) > 1:
            pairs += [f"{args.variants[-1]}:{v}" for v in args.variants[:-1]]
        lines += ["", "Paired by training seed (same bags, same test split):", "",
                  *paired_by_seed(sparse_rows, pairs, ("auc",), lambda r, key: r["test"][key])]
        rows += [{"dataset": "fashion-sparse", **r} for r in sparse_rows]
    if args.step_rounds:
        secs = step_seconds(args.variants, args.step_instances, args.step_dim, args.step_rounds)
        base = args.variants[-1]
        lines += ["", f"## Seconds per training step, one bag of {args.step_instances:,} x {args.step_dim} "
                  f"(median of {args.step_rounds} interleaved rounds, {torch.get_num_threads()} threads)", "",
                  f"| variant | seconds per step | ratio to {base} |", "|---|---|---|"]
        lines += [f"| {v} | {s:.3f} | {s / secs[base]:.2f} |" for v, s in secs.items()]
        rows.append({"step_seconds": secs, "instances": args.step_instances, "dim": args.step_dim})
    write_results(args.out, rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
