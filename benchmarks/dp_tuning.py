"""Choose local DP-SGD settings on the TRAINING sites' validation splits, fast.

A Flower simulation of the DP federation takes about 30 s per round here; this runs the
same per-site DP-SGD plan (Opacus, Poisson rate q, per-patient clipping, noise calibrated
to the whole run's budget) and patient-weighted FedAvg in one process, about 1-5 s per
round, and prints the pooled validation AUC of the training sites after every round. The
held-out site is never read, so settings picked here are not selected on the test data.
The figures that go into tables come from `micromil simulate` (privacy_utility.py).

    python benchmarks/dp_tuning.py --data-root /tmp/privb6/data/fashion \\
        --param proj_dim=32 --param gnn_hidden=32 --epochs 4 --lr 1e-2
    python benchmarks/dp_tuning.py --data-root ... --no-dp     # the same schedule without DP
    python benchmarks/dp_tuning.py --data-root ... --seed 1 --noise-seed 2   # run-to-run spread
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from micromil_core.config import DataConfig, LocalPrivacyConfig, TrainConfig
from micromil_core.data.data_root import read_sites_yaml
from micromil_core.data.scaler import FeatureScaler
from micromil_core.federated.setup import initial_model_state
from micromil_core.federated.site_task import ModelSpec
from micromil_core.privacy.dp_sgd import (
    DPPlan,
    calibrate_noise,
    state_dict_for,
    steps_per_epoch,
    train_private,
)
from micromil_core.training.checkpoint import load_checkpoint
from micromil_core.training.loading import load_sites, split_train_val_test
from micromil_core.training.metrics import roc_auc
from micromil_core.training.trainer import predict_bags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--model", default="micromil")
    ap.add_argument("--param", action="append", default=[], help="model param, key=value")
    ap.add_argument("--encoder", default="histo-texture")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--sample-rate", type=float, default=0.25)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--no-dp", action="store_true", help="no clipping and no noise")
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--momentum", type=float, default=0.0, help="sgd momentum")
    ap.add_argument("--seed", type=int, default=0, help="the server's initial weights")
    ap.add_argument("--ema", type=float, nargs="*", default=[],
                    help="also report an exponential moving average of the global model over "
                    "rounds with these decays (post-processing: no extra privacy cost)")
    ap.add_argument("--init-from", metavar="MODEL_PT",
                    help="start from this checkpoint's weights (e.g. trained on public data) "
                    "instead of the seeded data-free init")
    ap.add_argument("--freeze", action="append", default=[], metavar="PREFIX",
                    help="keep parameters whose name starts with PREFIX fixed (e.g. proj, dce)")
    ap.add_argument("--scaler", choices=("site", "global"), default="site",
                    help="site: each site standardises with its own moments (what DP sites do); "
                    "global: pooled moments of all training sites (what a non-DP federation shares)")
    ap.add_argument("--weighting", choices=("patients", "noise"), default="patients",
                    help="patients: FedAvg weights by patient count; noise: by the inverse "
                    "variance of each site's DP noise, (q n / sigma)^2 (post-processing)")
    ap.add_argument("--noise-seed", type=int, default=0,
                    help="seeds the Poisson sampling and DP noise, independently of --seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")

    root = Path(args.data_root)
    train_sites = read_sites_yaml(root).train_sites
    splits = [split_train_val_test(sb, TrainConfig(seed=args.seed))[:2]
              for sb in load_sites(train_sites, DataConfig(encoder=args.encoder), device)]
    pooled = FeatureScaler.fit([b for train, _ in splits for b in train])
    parts = []
    for train, val in splits:
        scaler = pooled if args.scaler == "global" else FeatureScaler.fit(train)
        parts.append((scaler.transform_all(train), scaler.transform_all(val)))
    params = dict(kv.split("=", 1) for kv in args.param)
    spec = ModelSpec(args.model, int(parts[0][0][0].features.shape[1]), 2, params)
    if args.init_from:
        model = load_checkpoint(args.init_from).build_model()
    else:
        model = spec.build(initial_model_state(spec, args.seed))  # the server's data-free init

    for name, p in model.named_parameters():
        if name.startswith(tuple(args.freeze)):
            p.requires_grad_(False)
    privacy = LocalPrivacyConfig(
        mode="dp-sgd", target_epsilon=args.epsilon, delta=args.delta,
        max_grad_norm=args.max_grad_norm, sample_rate=args.sample_rate,
    )
    steps = steps_per_epoch(args.sample_rate) * args.epochs
    sigma = 0.0 if args.no_dp else calibrate_noise(privacy, args.sample_rate, steps * args.rounds)
    plan = DPPlan(sigma, args.sample_rate, 1e6 if args.no_dp else args.max_grad_norm)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"parameters": n_params, "noise_multiplier": sigma, "steps_per_round": steps}))
    weights = np.array([len(train) for train, _ in parts], dtype=float)
    if args.weighting == "noise":  # same q and sigma at every site here: (q n / sigma)^2 ~ n^2
        weights = weights ** 2
    weights /= weights.sum()
    val = [b for _, v in parts for b in v]
    frozen_start = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    averages: dict[float, torch.nn.Module] = {}
    y, probs = predict_bags(model, val, device, batch_size=64)
    print(json.dumps({"round": 0, "train_sites_val_auc": round(roc_auc(y, probs), 4)}), flush=True)
    for r in range(args.rounds):
        states = []
        for i, (train, _) in enumerate(parts):
            trained, _ = train_private(
                copy.deepcopy(model), train, plan, steps, args.lr, 1e-6, device,
                seed=1000 * r + i + 100000 * args.noise_seed, progress=r / args.rounds,
                optimizer=args.optimizer, momentum=args.momentum,
            )
            states.append(state_dict_for(model, trained))
        model.load_state_dict({  # patient-weighted FedAvg
            k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True)).to(v.dtype)
            for k, v in model.state_dict().items()
        })
        y, probs = predict_bags(model, val, device, batch_size=64)
        row = {"round": r + 1, "train_sites_val_auc": round(roc_auc(y, probs), 4)}
        current = model.state_dict()
        for decay in args.ema:
            avg = averages.setdefault(decay, copy.deepcopy(model))
            avg.load_state_dict({
                k: (decay * v.float() + (1 - decay) * current[k].float()).to(v.dtype)
                if v.is_floating_point() else current[k]
                for k, v in avg.state_dict().items()
            })
            y, probs = predict_bags(avg, val, device, batch_size=64)
            row[f"ema{decay:g}_val_auc"] = round(roc_auc(y, probs), 4)
        if frozen_start:  # check that frozen really means unchanged
            params = dict(model.named_parameters())
            row["frozen_max_change"] = max(float((params[n] - v).abs().max()) for n, v in frozen_start.items())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
