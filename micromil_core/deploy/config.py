"""Coordinator and hospital deployment settings, parsed once from YAML.

Relative paths in a deployment YAML are relative to the YAML file, so a provisioned
``deploy/`` folder can be moved or mounted as a whole. Errors name the file and the key.

Coordinator (``flower-server start --config deploy/federation.yaml``)::

    experiment: ../configs/deploy-musk1.yaml   # model/train/federation: the simulate YAML
    state_dir: state                           # SuperLink database, logs, run id
    superlink: {host: 0.0.0.0, port: 9092, ca_cert: ..., cert: ..., key: ...,
                node_auth: true, registered_keys: pki/registered}
    run: {out_dir: runs/federation, expected_sites: 4, wait_for_sites: 600, resume: auto}

Hospital (``flower-client run --config deploy/site.yaml``)::

    site: {name: hospital-1, data_path: /data/hospital-1, role: train}
    superlink: {address: coordinator.example.org:9092, ca_cert: ..., private_key: ...}
    supernode: {port: 9094, state_dir: state, retry_backoff: 60, retry_backoff_max: 600,
                max_activation_retries: 0}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micromil_core.config import LocalPrivacyConfig, build_section, load_config, load_yaml
from micromil_core.data.data_root import ROLES
from micromil_core.errors import ConfigError

RESUME_MODES = ("auto", "never")


@dataclass(frozen=True)
class SuperLinkServerConfig:
    """How the coordinator's SuperLink listens. One port serves sites and the operator."""

    host: str = "0.0.0.0"
    port: int = 9092
    ca_cert: str = "pki/coordinator/ca.pem"
    cert: str = "pki/coordinator/server.pem"
    key: str = "pki/coordinator/server.key"
    node_auth: bool = True  # only hospitals whose public key is registered may join
    registered_keys: str = "pki/coordinator/registered"  # <site-name>.pub per hospital

    def __post_init__(self) -> None:
        _check_port("superlink.port", self.port)


@dataclass(frozen=True)
class RunSettings:
    """The federated run the coordinator submits to its SuperLink."""

    out_dir: str = "runs/federation"
    expected_sites: int = 2  # training + held-out sites to wait for before round 1
    wait_for_sites: float = 600.0  # seconds to wait for them
    resume: str = "auto"  # auto: continue from the last checkpointed round in out_dir

    def __post_init__(self) -> None:
        if self.expected_sites < 1:
            raise ConfigError(f"run.expected_sites={self.expected_sites} is invalid: expected >= 1")
        if self.wait_for_sites <= 0:
            raise ConfigError(f"run.wait_for_sites={self.wait_for_sites} is invalid: expected > 0")
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"run.resume={self.resume!r} is invalid: expected one of {RESUME_MODES}")


@dataclass(frozen=True)
class CoordinatorConfig:
    experiment: Path
    state_dir: Path
    superlink: SuperLinkServerConfig
    run: RunSettings
    source: Path  # the YAML it came from; relative paths resolve against its folder

    def path(self, value: str) -> Path:
        return _resolve(self.source, value)

    @property
    def out_dir(self) -> Path:
        return self.path(self.run.out_dir)


@dataclass(frozen=True)
class SiteIdentity:
    name: str = ""
    data_path: str = ""
    role: str = "train"

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(
                f"site.name={self.name!r} is invalid: use letters, digits, '-', '_' or '.'"
            )
        if not self.data_path:
            raise ConfigError("site.data_path is missing: the folder with patients.csv")
        if self.role not in ROLES:
            raise ConfigError(f"site.role={self.role!r} is invalid: expected one of {ROLES}")


@dataclass(frozen=True)
class SuperLinkClientConfig:
    """How a hospital reaches the coordinator."""

    address: str = ""
    ca_cert: str = "pki/ca.pem"  # the federation's CA: proves the coordinator is genuine
    private_key: str = ""  # this hospital's key; its public half is registered centrally

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(
                f"superlink.address={self.address!r} is invalid: expected host:port, "
                "e.g. coordinator.example.org:9092"
            )


# Flower 1.41's SuperLink refuses a node that reconnects within about 50 s of being killed
# hard (two missed 30 s heartbeats), so the first retry after a refusal waits longer than that.
REFUSAL_WINDOW_S = 50.0
ISOLATION_MODES = ("process", "subprocess")


@dataclass(frozen=True)
class SuperNodeSettings:
    port: int = 9094  # local runtime API port; unique per SuperNode on one host
    state_dir: str = "state"  # Flower's app cache and this site's logs
    # After the coordinator refuses this node (Flower's "[code: 2004] Failed to activate
    # SuperNode"): wait retry_backoff s, doubling per refusal up to retry_backoff_max s.
    retry_backoff: float = 60.0
    retry_backoff_max: float = 600.0
    max_activation_retries: int = 0  # refusals in a row before giving up; 0 = retry forever
    # process: one long-lived ClientApp process (client.worker) takes every message, with
    # imports and the site's bags kept warm; subprocess: Flower's default, a fresh process per
    # message that runs the code of the coordinator's app.
    isolation: str = "process"
    # Seconds between the SuperNode's checks for a new message (Flower's own: 3, which every
    # exchange of a round then waits); 0 runs Flower's flower-supernode unchanged.
    pull_interval: float = 0.5

    def __post_init__(self) -> None:
        _check_port("supernode.port", self.port)
        if not 0 <= self.pull_interval <= 3:
            raise ConfigError(
                f"supernode.pull_interval={self.pull_interval} is invalid: expected seconds in "
                "[0, 3] (default 0.5; 0 = Flower's own 3 s)"
            )
        if self.isolation not in ISOLATION_MODES:
            raise ConfigError(
                f"supernode.isolation={self.isolation!r} is invalid: expected one of "
                f"{', '.join(ISOLATION_MODES)} (process: one warm ClientApp process for all "
                "messages, the default; subprocess: Flower's fresh process per message)"
            )
        if not self.retry_backoff > 0:
            raise ConfigError(
                f"supernode.retry_backoff={self.retry_backoff} is invalid: expected seconds > 0 "
                f"(default 60; the coordinator refuses a hard-killed node for about "
                f"{REFUSAL_WINDOW_S:.0f} s, so a shorter wait is usually refused again)"
            )
        if self.retry_backoff_max < self.retry_backoff:
            raise ConfigError(
                f"supernode.retry_backoff_max={self.retry_backoff_max} is invalid: expected "
                f">= supernode.retry_backoff ({self.retry_backoff})"
            )
        if self.max_activation_retries < 0:
            raise ConfigError(
                f"supernode.max_activation_retries={self.max_activation_retries} is invalid: "
                "expected 0 (retry forever) or a number of retries >= 1"
            )


@dataclass(frozen=True)
class SiteDeployConfig:
    site: SiteIdentity
    superlink: SuperLinkClientConfig
    supernode: SuperNodeSettings
    source: Path
    # The hospital's own DP-SGD settings (its decision, not the coordinator's).
    privacy: LocalPrivacyConfig = LocalPrivacyConfig()

    def path(self, value: str) -> Path:
        return _resolve(self.source, value)


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    raw = _load(path, ("experiment", "state_dir", "superlink", "run"))
    if not isinstance(raw.get("experiment"), str):
        raise ConfigError(
            f"{path}: 'experiment' must name the experiment YAML (model/train/federation), "
            "e.g. experiment: ../configs/deploy-musk1.yaml"
        )
    source = Path(path).resolve()
    cfg = CoordinatorConfig(
        experiment=_resolve(source, raw["experiment"]),
        state_dir=_resolve(source, str(raw.get("state_dir", "state"))),
        superlink=_section(path, "superlink", SuperLinkServerConfig, raw),
        run=_section(path, "run", RunSettings, raw),
        source=source,
    )
    if not cfg.experiment.is_file():
        raise ConfigError(f"{path}: experiment file {cfg.experiment} not found")
    # Parsed in full here, so a typo in the experiment stops `flower-server start` instead
    # of surfacing later in the log of Flower's server process.
    _check_initial_model(cfg.experiment, load_config(cfg.experiment).federation.initial_model)
    return cfg


def _check_initial_model(experiment: Path, value: str) -> None:
    """A starting model must be an absolute path that exists: Flower runs the coordinator's
    round loop in its own process and folder, where a relative path means something else."""
    if not value:
        return
    if not Path(value).is_absolute():
        raise ConfigError(
            f"{experiment}: federation.initial_model {value!r} must be an absolute path in a "
            f"deployment (the server process does not run in this folder), e.g. "
            f"{(experiment.parent / value).resolve()}"
        )
    if not Path(value).is_file():
        raise ConfigError(f"{experiment}: federation.initial_model {value} not found on the coordinator")


def load_site_config(path: str | Path) -> SiteDeployConfig:
    raw = _load(path, ("site", "superlink", "supernode", "privacy"))
    return SiteDeployConfig(
        site=_section(path, "site", SiteIdentity, raw),
        superlink=_section(path, "superlink", SuperLinkClientConfig, raw),
        supernode=_section(path, "supernode", SuperNodeSettings, raw),
        source=Path(path).resolve(),
        privacy=_section(path, "privacy", LocalPrivacyConfig, raw),
    )


def require_files(cfg_path: Path, files: dict[str, Path]) -> None:
    """One error listing every missing certificate/key, with the command that makes them."""
    missing = [f"{key}: {p}" for key, p in files.items() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{cfg_path}: missing file(s) " + "; ".join(missing)
            + ". Create them with `flower-server provision` (see README, Deployment), "
            "or fix the paths"
        )


def _load(path: str | Path, sections: tuple[str, ...]) -> dict[str, Any]:
    raw = load_yaml(path)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sections)}"
        )
    return raw


def _section(path: str | Path, name: str, cls: type, raw: dict[str, Any]) -> Any:
    try:
        return build_section(name, cls, raw.get(name))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _resolve(source: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (source.parent / p).resolve()


def _check_port(key: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}={port} is invalid: expected a TCP port 1-65535")


