"""``flower-server``: the coordinator's command.

    flower-server provision --out deploy/pki --server-name coord.example.org --sites h1 h2 h3
    flower-server start  --config deploy/federation.yaml    # SuperLink + run, streams progress
    flower-server status --config deploy/federation.yaml    # SuperLink, sites online, run
    flower-server stop   --config deploy/federation.yaml
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from micromil_core.cli import command_parser, dispatch
from micromil_core.cli.options import brief_metrics

DEFAULT_CONFIG = "deploy/federation.yaml"


def _coordinator(args: argparse.Namespace):
    from micromil_core.deploy.config import load_coordinator_config
    from micromil_core.deploy.coordinator import Coordinator

    return Coordinator(load_coordinator_config(args.config), insecure=getattr(args, "insecure", False))


def cmd_provision(args: argparse.Namespace) -> int:
    from micromil_core.deploy.pki import provision

    result = provision(args.out, args.server_name, args.sites, renew_server=args.renew_server_cert)
    for path in result.created:
        print(f"created {path}")
    for path in result.kept:
        print(f"kept    {path}")
    out = Path(args.out)
    print(
        f"\ncoordinator: {out / 'coordinator'} (point superlink.* in federation.yaml here)\n"
        f"hospitals:   give each {out / 'sites'}/<site>/ to that hospital only\n"
        f"CA key:      {out / 'ca' / 'ca.key'} -- move it offline; needed only to add sites later"
    )
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from micromil_core.config import load_config
    from micromil_core.deploy.coordinator import INSECURE_WARNING

    coord = _coordinator(args)
    experiment = load_config(coord.cfg.experiment)  # fail on a bad experiment before starting
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    coord.check()
    if args.foreground:  # a service manager's SIGTERM stops the run and the SuperLink cleanly
        signal.signal(signal.SIGTERM, _exit_on_signal)
    proc = coord.start_superlink(foreground=args.foreground)
    try:
        coord.wait_until_ready(proc)
        print(f"SuperLink listening on {coord.cfg.superlink.host}:{coord.cfg.superlink.port} "
              f"(pid {proc.pid}, log {coord.paths.log})")
        if coord.node_auth:
            sites = coord.register_sites()
            print(f"admitted hospitals: {', '.join(sorted(sites))}")
        resume = coord.cfg.run.resume == "auto" and not args.fresh
        if resume and (coord.cfg.out_dir / "federation-state.pt").is_file():
            print(f"continuing from the last checkpointed round in {coord.cfg.out_dir}")
        run_id = coord.submit(resume)
        print(f"run {run_id} submitted: {experiment.model.name}, {experiment.federation.rounds} "
              f"rounds, waiting for {coord.cfg.run.expected_sites} sites; results in "
              f"{coord.cfg.out_dir}", flush=True)
        if args.detach:
            print("detached; follow with `flower-server status` or "
                  f"`FLWR_HOME={coord.paths.flwr_home} flwr log {run_id}`")
            return 0
        status = coord.follow(run_id)
        print(f"run {run_id}: {status}")
        _print_summary(coord.cfg.out_dir, status)
        if args.foreground:  # keep serving the hospitals until the service is stopped
            return proc.wait()
        return 0 if status == "finished:completed" else 1
    except KeyboardInterrupt:
        if args.foreground:
            raise
        print("\nstopped following; the SuperLink and the run continue "
              "(`flower-server status`, `flower-server stop`)", file=sys.stderr)
        return 130
    finally:
        if args.foreground:
            coord.stop()


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _print_summary(out: Path, status: str) -> None:
    metrics = out / "metrics.json"
    if status == "finished:completed" and metrics.is_file():
        m = json.loads(metrics.read_text())
        print(f"held-out sites: {brief_metrics(m)} (n={m.get('n')}); model {out / 'model.pt'}")
        if m.get("model_sha256"):  # hospitals check the copy they receive against this
            print(f"model sha256: {m['model_sha256']} (check a copy with `micromil inspect`)")


def cmd_status(args: argparse.Namespace) -> int:
    coord = _coordinator(args)
    info = coord.status()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    sl = info["superlink"]
    state = f"running (pid {sl['pid']})" if sl["running"] else "not running"
    print(f"SuperLink: {state}; log {sl['log']}")
    for line in _security_lines(info.get("security")):
        print(line)
    for site in info.get("sites", []):
        print(f"  {site['site']:<24} {site['status']}")
    if "run" in info:
        r = info["run"]
        print(f"run {r['run_id']}: {r['status']} ({r['elapsed_s'] or 0:.0f} s); results in {r['out_dir']}")
    return 0


def _security_lines(security: dict | None) -> list[str]:
    """What the running SuperLink enforces, with a warning for anything switched off."""
    if security is None:
        return []
    tls, auth = security.get("tls"), security.get("node_auth")
    if tls is None:
        return ["security: unknown (cannot read the SuperLink's command line on this system)"]
    on = {True: "on", False: "OFF"}
    lines = [f"security: TLS {on[tls]}, node authentication {on[bool(auth)]}"]
    if not tls:
        lines.append("WARNING: the SuperLink runs --insecure: model updates travel in clear text "
                     "and any machine that reaches its port can join. Closed test networks only; "
                     "restart it without --insecure")
    elif not auth:
        lines.append("WARNING: node authentication is off (superlink.node_auth: false): any machine "
                     "that reaches its port can join as a hospital")
    return lines


def cmd_stop(args: argparse.Namespace) -> int:
    for line in _coordinator(args).stop():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(
        "flower-server", "Coordinate a micromil-fl federation over Flower's SuperLink."
    )

    p = sub.add_parser("provision", help="make the CA, the coordinator certificate and hospital keys")
    p.add_argument("--out", default="deploy/pki", help="folder for the PKI (default deploy/pki)")
    p.add_argument("--server-name", action="append", default=[], required=True,
                   help="DNS name or IP the hospitals use to reach the coordinator (repeatable)")
    p.add_argument("--sites", nargs="+", default=[], help="hospital site names")
    p.add_argument("--renew-server-cert", action="store_true",
                   help="issue a new coordinator certificate (e.g. new address); keys are kept")
    p.set_defaults(func=cmd_provision)

    for name, func, text in (
        ("start", cmd_start, "start the SuperLink and submit the federated run"),
        ("status", cmd_status, "SuperLink, hospitals online, current run"),
        ("stop", cmd_stop, "stop the run and the SuperLink"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"coordinator YAML (default {DEFAULT_CONFIG})")
        p.set_defaults(func=func)
        if name == "status":
            p.add_argument("--json", action="store_true")
        if name == "start":
            p.add_argument("--insecure", action="store_true",
                           help="no TLS, no node authentication (closed test networks only)")
            p.add_argument("--detach", action="store_true", help="return after submitting the run")
            p.add_argument("--foreground", action="store_true",
                           help="keep the SuperLink attached to this process (systemd, containers)")
            p.add_argument("--fresh", action="store_true",
                           help="start at round 1 even if out_dir holds a checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
