"""The `micromil simulate` and `micromil compare` commands: a federation on one machine.

They live beside the Flower layer they drive; the core CLI (micromil_core.cli) finds them
through the ``micromil.commands`` entry point in pyproject.toml, so the core never imports
Flower or this package. Flower is imported when one of them runs, not when the parser
is built, so `micromil models` stays quick.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from micromil_core.cli.options import (
    add_federation_args,
    brief_metrics,
    claim_out,
    experiment_config,
)


def register(sub: Any) -> None:
    """Add ``simulate`` and ``compare`` to the ``micromil`` subcommands ``sub``."""
    p = sub.add_parser("simulate", help="simulate a whole federation on this machine")
    add_federation_args(p)
    p.add_argument("--resume", action="store_true", help="continue after the last saved round")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="local-only vs pooled vs federated on held-out sites")
    add_federation_args(p)
    p.set_defaults(func=cmd_compare)


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.simulation import simulate

    cfg = experiment_config(args, check_model=False)  # simulate checks the model
    if not args.resume:
        claim_out(args, "history.json", "model.pt", "federation-state.pt")
    metrics = simulate(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    from micromil_core.report import metric_text  # after the run: it imports torch

    print(f"held-out sites, round {metrics['round']}: {brief_metrics(metrics)}  (n={metrics['n']})")
    for site, m in metrics.get("per_site", {}).items():
        if m.get("suppressed"):
            print(f"  {site}: {', '.join(m['suppressed'])} {metric_text(m, m['suppressed'][0])}")
        if "auc_ci_low" in m:
            print(
                f"  {site}: auc {m['auc']:.3f} (95% CI {m['auc_ci_low']:.3f}-"
                f"{m['auc_ci_high']:.3f}, bootstrap over its {m.get('num-examples', '?')} patients)"
            )
    out = Path(args.out)
    for line in personal_lines(metrics, out):
        print(line)
    print(f"model: {out / 'model.pt'} (sha256 {metrics.get('model_sha256', '?')})")
    print(f"history: {out / 'history.json'}")
    print(f"report: {out / 'report.html'}")
    return 0


def personal_lines(metrics: dict[str, Any], out: Path) -> list[str]:
    """What each training site reported of its personal model, for the console."""
    from micromil_core.report.personal import choice_line

    personal = metrics.get("personalised")
    if not personal:
        return []
    lines = [f"personal models ({personal['method']}), kept at each training site in "
             f"{out / 'site-state' / '<site>' / 'personal'}:"]
    chosen_by = personal.get("chosen_by")
    lines += [f"  {choice_line(site, m, chosen_by)}" for site, m in personal["per_site"].items()]
    return lines + [f"  {failure}" for failure in personal.get("failures", [])]


def cmd_compare(args: argparse.Namespace) -> int:
    from micromil_core.report import (
        comparison_rows,
        format_own_patients,
        format_paired_difference,
        format_table,
        table_keys,
    )
    from server.simulation import compare

    cfg = experiment_config(args)
    claim_out(args, "metrics.json", "compare.json")
    table = compare(cfg, args.out, overwrite=args.overwrite)
    rows = comparison_rows(table)
    print(format_table(rows, table_keys(rows)))
    paired = format_paired_difference(table)
    if paired:
        print(f"\n{paired}")
    own = format_own_patients(table)  # "" unless --personalise
    if own:
        print(f"\n{own}")
    out = Path(args.out)
    print(f"\ntable: {out / 'metrics.json'}  report: {out / 'federated' / 'report.html'}")
    return 0
