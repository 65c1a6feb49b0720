"""Why MicroMIL's representatives collapse: measurements on a trained model (issue 19).

For every bag of the given sites, with the model in eval mode:
- diversity: distinct representatives / min(N, K);
- q entropy: mean normalised entropy of the soft cluster assignments, H(q_n) / log K
  (1 = every instance equally assigned to every cluster);
- q contrast: per cluster, max_n q_nk / mean_n q_nk (1 = the cluster weighs every
  instance the same);
- same-as-score pick: the share of clusters whose representative is the instance with the
  largest shared score a_n = w . h_n. The selection score is s_nk = q_nk * a_n, one scalar
  per instance scaled by q: with q near uniform every cluster picks argmax_n a_n;
- centroid spread: mean pairwise centroid distance / mean distance of an instance to its
  nearest centroid (small = centroids drifted together against the data).

    .venv/bin/python benchmarks/micromil_collapse.py --model RUN/model.pt --data SITE [SITE ...] \
        --out benchmarks/results/micromil_collapse_NAME
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    from micromil_core.data.bag import collate_bags
    from micromil_core.io import write_json_atomic, write_text_atomic
    from micromil_core.training.mechanism import bag_picks, representative_diversity
    from micromil_core.training.score import load_checkpoint_and_sites

    run = load_checkpoint_and_sites(args.model, args.data, "cpu", None, False, True, None)
    model = run.model.eval()
    k = model.params.n_clusters
    picks, entropy, contrast, same, spread = [], [], [], [], []
    with torch.no_grad():
        mu = model.dce.centroids
        pair = torch.cdist(mu, mu)
        centroid_gap = float(pair.sum() / (k * (k - 1))) if k > 1 else math.nan
        for sb in run.sites:
            for bag in run.model_inputs(sb, sb.bags):
                batch = collate_bags([bag])
                out = model.run(batch.x, batch.mask)
                n = bag.num_instances
                q = out.q[0, :n]  # (N, K)
                a = model.score(model.project(batch.x))[0, :n, 0]  # (N,)
                picks.append(bag_picks(out.selected[0].tolist(), n))
                ent = -(q.clamp_min(1e-12).log() * q).sum(-1) / math.log(k)
                entropy.append(float(ent.mean()))
                contrast.append(float((q.max(0).values / q.mean(0)).mean()))
                same.append(float((out.selected[0] == a.argmax()).float().mean()))
                h = model.project(batch.x)[0, :n]
                spread.append(float(torch.cdist(h, mu).min(-1).values.mean()))
    div = representative_diversity(picks)
    summary = {
        "model": args.model, "label": args.label, "bags": len(picks), "K": k,
        "diversity": div,
        "q_entropy_mean": float(np.mean(entropy)),
        "q_contrast_mean": float(np.mean(contrast)),
        "same_as_score_pick": float(np.mean(same)),
        "centroid_gap_over_instance_distance": centroid_gap / float(np.mean(spread)),
    }
    write_json_atomic(Path(args.out + ".json"), summary)
    lines = [
        f"# MicroMIL collapse diagnostics: {args.label or args.model}",
        "",
        f"Command: `.venv/bin/python benchmarks/micromil_collapse.py --model {args.model} --data "
        f"{' '.join(args.data)} --out {args.out}`",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| bags | {len(picks)} (K = {k}) |",
        f"| diversity mean / median | {div['mean']:.3f} / {div['median']:.3f} |",
        f"| bags whose K picks are one instance | {div['single_fraction']:.0%} |",
        f"| q entropy / log K (1 = uniform) | {summary['q_entropy_mean']:.4f} |",
        f"| q contrast max_n q_nk / mean_n q_nk (1 = flat) | {summary['q_contrast_mean']:.3f} |",
        f"| clusters picking argmax_n a_n (the shared score) | {summary['same_as_score_pick']:.0%} |",
        f"| mean centroid gap / mean instance-to-nearest-centroid distance | "
        f"{summary['centroid_gap_over_instance_distance']:.3f} |",
        "",
    ]
    write_text_atomic(Path(args.out + ".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
