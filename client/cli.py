"""``flower-client``: a hospital's command.

    flower-client check  --config deploy/site.yaml   # the site data, as the federation will read it
    flower-client run    --config deploy/site.yaml   # check, then join as a SuperNode (retries refusals)
    flower-client keygen --name hospital-1 --out keys  # own key pair; send only the .pub
    flower-client personalise --config deploy/site.yaml --model model.pt --out site-model.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from micromil_core.cli import command_parser, dispatch

DEFAULT_CONFIG = "deploy/site.yaml"


def _config(args: argparse.Namespace):
    from micromil_core.deploy.config import load_site_config

    return load_site_config(args.config)


def cmd_check(args: argparse.Namespace) -> int:
    from micromil_core.deploy.site import check_site_data

    print(check_site_data(_config(args)).format())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from micromil_core.deploy.site import INSECURE_WARNING, check_site_data, run_supernode

    cfg = _config(args)
    report = check_site_data(cfg)
    print(report.format(), flush=True)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    print(f"joining {cfg.superlink.address} as {cfg.site.name} ({cfg.site.role})", flush=True)
    return run_supernode(cfg, insecure=args.insecure)


def cmd_keygen(args: argparse.Namespace) -> int:
    from micromil_core.deploy.pki import make_site_key

    key, pub = make_site_key(args.out, args.name)
    print(f"private key {key} (keep it here)\npublic key  {pub} (send it to the coordinator)")
    return 0


def cmd_personalise(args: argparse.Namespace) -> int:
    from micromil_core.federated.personalise import personalise_checkpoint
    from micromil_core.federated.site_task import SiteSettings

    cfg = _config(args)
    site = SiteSettings(cfg.site.name, cfg.path(cfg.site.data_path), "train", privacy=cfg.privacy,
                        state_dir=cfg.path(cfg.supernode.state_dir))
    metrics = personalise_checkpoint(args.model, site, args.out, args.method, args.overrides, args.device)
    epoch = metrics.get("personal_epoch", 0)
    print(f"{cfg.site.name}: validation AUC global {metrics.get('val_auc_global', 'n/a')} -> personal "
          f"{metrics.get('val_auc_personal', 'n/a')} over {metrics.get('num_val', 0)} patients; "
          + (f"fine-tuned model from epoch {epoch}" if epoch else "the global model was best and is kept"))
    print(f"personal model: {args.out} (stays at this site)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from micromil_core.config import PERSONAL_METHODS

    parser, sub = command_parser("flower-client", "Join a micromil-fl federation as a hospital.")
    for name, func, text in (
        ("check", cmd_check, "check this site's data"),
        ("run", cmd_run, "check the data, then start this site's SuperNode"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"site YAML (default {DEFAULT_CONFIG})")
        p.set_defaults(func=func)
        if name == "run":
            p.add_argument("--insecure", action="store_true",
                           help="no TLS (only against a coordinator started with --insecure)")
    p = sub.add_parser("keygen", help="make this hospital's node-authentication key pair")
    p.add_argument("--name", required=True, help="this hospital's site name")
    p.add_argument("--out", default=".", help="folder for <name>.key and <name>.pub")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("personalise", help="this site's own model from the federation's global model")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"site YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--model", required=True, help="the global model.pt the coordinator released")
    p.add_argument("--out", required=True, help="where to write the personal model (stays here)")
    p.add_argument("--method", default="finetune", choices=PERSONAL_METHODS,
                   help="finetune (default), proximal (stays near the global model), or "
                        "local-head (only the classifier head trains)")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. federation.personal_epochs=30, federation.personal_mu=0.5")
    p.set_defaults(func=cmd_personalise)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
