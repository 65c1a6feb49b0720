"""Arguments shared by several commands (config, data, scoring, federation) and the
one-line summaries they print."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from micromil_core.errors import MicroMILError


def add_config_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
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
    p.add_argument("--stain-normalise", metavar="METHOD:REF",
                   help="with --encoder: map tiles towards a reference image's stain before "
                   "encoding, as `extract --stain-normalise` does (shortcut for "
                   "data.stain_normalise; one reference file at every site)")
    p.add_argument(
        "--classes",
        help="the class names in index order, e.g. negative,positive (shortcut for "
        "data.classes; a data root's sites.yaml declares them already)",
    )


def add_data_args(p: argparse.ArgumentParser, holdout: bool) -> None:
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


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """Arguments of the commands that run a checkpoint on sites (evaluate, predict)."""
    p.add_argument("--model", required=True, help="checkpoint (model.pt)")
    add_data_args(p, holdout=True)
    p.add_argument("--explain", action="store_true", help="per-patient galleries (stay on site)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threshold", type=float, help=THRESHOLD_HELP)


def experiment_config(args: argparse.Namespace, check_model: bool = True):
    """The experiment the flags and ``--config`` describe. ``check_model`` refuses a wrong
    model name or param here, before any data is read; a caller that checks them itself
    (``simulate``: after it has started Flower's SuperLink, as this imports torch) passes
    False."""
    from micromil_core.config import check_model_params, load_config

    overrides = list(args.overrides)
    for flag, key in (
        ("model", "model.name"),
        ("epochs", "train.epochs"),
        ("seed", "train.seed"),
        ("device", "train.device"),
        ("encoder", "data.encoder"),
        ("stain_normalise", "data.stain_normalise"),
        ("classes", "data.classes"),
        ("strategy", "federation.strategy"),
        ("rounds", "federation.rounds"),
        ("local_epochs", "federation.local_epochs"),
        ("personalise", "federation.personalise"),
        ("fed_data_root", "simulation.data_root"),
        ("train_sites", "simulation.train_sites"),
        ("holdout_sites", "simulation.holdout_sites"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    if check_model:
        check_model_params(cfg)
    root = getattr(args, "data_root", None) or cfg.simulation.data_root
    if root:  # labels are checked against the data root's declared classes
        from micromil_core.data.data_root import with_declared_classes

        cfg = with_declared_classes(cfg, root)
    return cfg


def site_paths(args: argparse.Namespace, holdout: bool) -> list[Path]:
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


def print_json(obj: object) -> None:
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


def add_out_args(p: argparse.ArgumentParser, help: str = "output folder") -> None:
    """``--out`` and ``--overwrite``: every command refuses to replace an earlier run's
    results unless asked (``claim_out``), and checks the folder is writable first."""
    p.add_argument("--out", required=True, help=help)
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --out"
    )


def claim_out(args: argparse.Namespace, *markers: str) -> Path:
    """``args.out``, checked before any work: writable, and without an earlier run's
    ``markers`` files unless ``--overwrite``."""
    from micromil_core.io import claim_output_dir

    if not markers:  # the command checks its own output (calibrate writes one file)
        return Path(args.out)
    return claim_output_dir(args.out, markers, overwrite=getattr(args, "overwrite", False))


def add_federation_args(p: argparse.ArgumentParser) -> None:
    from micromil_core.config import PERSONALISE_METHODS

    add_config_args(p)
    p.add_argument("--data-root", dest="fed_data_root", help="prepared data root (sites.yaml)")
    p.add_argument("--train-sites", help="comma-separated site names (default: sites.yaml's)")
    p.add_argument("--holdout-sites", help="comma-separated held-out site names")
    p.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedyogi, fedmedian, ...")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--personalise", choices=PERSONALISE_METHODS,
                   help="a personal model for each training site, kept at the site "
                        "(docs/personalisation.md)")
    add_out_args(p)


