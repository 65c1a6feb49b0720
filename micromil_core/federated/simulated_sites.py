"""The hospitals of a federation simulated on one machine: which site folders of a data
root train and which are held out, and the privacy settings each simulated site takes.

Shared by ``micromil simulate`` (server/simulation.py) and the ClientApp when Flower itself
runs the simulation (``flwr run . local``), so both see the same sites in the same order:
training sites, then held-out sites; partition-id i is the i-th.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from micromil_core.config import ExperimentConfig, LocalPrivacyConfig, load_config
from micromil_core.data.data_root import read_sites_yaml, with_declared_classes
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.federated.site_task import SiteSettings


def resolve_sites(cfg: ExperimentConfig) -> list[SiteSettings]:
    """Training then held-out sites, from the data root's sites.yaml and the config."""
    sim = cfg.simulation
    if not sim.data_root:
        raise ConfigError("no data root: pass --data-root ROOT or set simulation.data_root")
    root = read_sites_yaml(sim.data_root)
    by_name = {s.name: s for s in root.sites}

    def pick(names: tuple[str, ...], default: list[Path], role: str) -> list[SiteSettings]:
        if not names:
            return [SiteSettings(p.name, p, role) for p in default]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SiteDataError(
                f"{sim.data_root}/sites.yaml has no site {', '.join(unknown)}; "
                f"its sites: {', '.join(sorted(by_name))}"
            )
        return [SiteSettings(n, Path(root.root) / by_name[n].path, role) for n in names]

    train = pick(sim.train_sites, list(root.train_sites), "train")
    holdout = pick(sim.holdout_sites, list(root.holdout_sites), "holdout")
    overlap = {s.name for s in train} & {s.name for s in holdout}
    if overlap:
        raise ConfigError(f"sites {sorted(overlap)} are both training and held-out sites")
    if not train:
        raise ConfigError("no training sites: set simulation.train_sites or --train-sites")
    return train + holdout


def with_local_privacy(sites: list[SiteSettings], cfg: ExperimentConfig, out: Path) -> list[SiteSettings]:
    """Simulated sites take the experiment's privacy settings: every site its small-count
    guard, training sites its DP-SGD too. Each training site keeps its own state (privacy
    ledger, personal model) under ``<out>/site-state/<site>/`` (in a deployment: the folder
    each hospital's site.yaml names)."""
    local = cfg.privacy.local
    guard_only = LocalPrivacyConfig(
        min_patients=local.min_patients, allow_small_counts=local.allow_small_counts
    )
    return [
        replace(s, privacy=local if local.enabled else guard_only, state_dir=out / "site-state" / s.name)
        if s.role == "train"
        else replace(s, privacy=guard_only)
        for s in sites
    ]


def experiment_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment of a Flower run: the YAML its run config names (``config``), with the
    run config's ``data-root`` (``flwr run . local``) as ``simulation.data_root``; labels
    are then checked against that data root's declared classes."""
    path = str(run_config.get("config") or "")
    root = str(run_config.get("data-root") or "")
    cfg = load_config(path or None, [f"simulation.data_root={root}"] if root else [])
    return with_declared_classes(cfg, root) if root else cfg
