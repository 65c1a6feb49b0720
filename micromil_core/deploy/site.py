"""A hospital's side: check the site data, then become a SuperNode of the federation."""

from __future__ import annotations

import json
import os

from micromil_core.data.site import SiteReport, check_site
from micromil_core.deploy.config import SiteDeployConfig, require_files
from micromil_core.deploy.flower_cli import flower_env, program
from micromil_core.errors import SiteDataError
from micromil_core.privacy.node_config import to_node_config as privacy_node_config

INSECURE_WARNING = (
    "WARNING: --insecure: this site will not verify the coordinator's certificate and will "
    "send model updates unencrypted. Use only on a closed test network."
)


def check_site_data(cfg: SiteDeployConfig) -> SiteReport:
    """The same checks as ``micromil check-site``; raises if the site cannot take part."""
    data = cfg.path(cfg.site.data_path)
    report = check_site(data)
    if not report.ok:
        raise SiteDataError(
            f"{cfg.source}: site data {data} has problems; fix them before joining "
            f"(details stay on this machine):\n{report.format()}"
        )
    return report


def node_config(cfg: SiteDeployConfig) -> str:
    """``--node-config`` text: TOML values, so strings are quoted (FLOWER_NOTES)."""
    values = {
        "site-name": cfg.site.name,
        "data-path": str(cfg.path(cfg.site.data_path)),
        "role": cfg.site.role,
        "state-dir": str(cfg.path(cfg.supernode.state_dir)),
        **privacy_node_config(cfg.privacy),
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(cfg: SiteDeployConfig, *, insecure: bool = False) -> list[str]:
    sl = cfg.superlink
    cmd = [
        program("flower-supernode"),
        "--superlink", sl.address,
        "--port", str(cfg.supernode.port),
        "--node-config", node_config(cfg),
    ]
    if insecure:
        return [*cmd, "--insecure"]
    files = {"superlink.ca_cert": cfg.path(sl.ca_cert)}
    if sl.private_key:
        files["superlink.private_key"] = cfg.path(sl.private_key)
    require_files(cfg.source, files)
    cmd += ["--root-certificates", str(files["superlink.ca_cert"])]
    if sl.private_key:
        cmd += ["--auth-supernode-private-key", str(files["superlink.private_key"])]
    return cmd


def supernode_env(cfg: SiteDeployConfig) -> dict[str, str]:
    home = cfg.path(cfg.supernode.state_dir) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    return flower_env(home)


def exec_supernode(cfg: SiteDeployConfig, *, insecure: bool = False) -> None:
    """Replace this process by the SuperNode, so service managers signal it directly."""
    cmd = supernode_command(cfg, insecure=insecure)
    os.execve(cmd[0], cmd, supernode_env(cfg))
