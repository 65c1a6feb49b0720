"""The deployment files under deploy/: they parse and load with the project's own loaders,
their paths agree with the container mounts, and each container or service gets only its
own keys and data. Fast: nothing is built or started."""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from micromil_core.config import load_config
from micromil_core.deploy.config import load_coordinator_config, load_site_config
from micromil_core.deploy.pki import certificate_names, provision
from server.cli import build_parser as server_parser

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
IMAGE_DEPLOY = "/srv/micromil/deploy"  # where deploy/ sits in the image (WORKDIR /srv/micromil)
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
LOCAL_ONLY = {"pki", "data", "state", "runs"}  # git-ignored working folders, never shipped
UNITS = {
    "coordinator": (
        DEPLOY / "systemd" / "micromil-coordinator.service",
        "flower-server",
        ["start", "--config", "/etc/micromil/federation.yaml", "--foreground"],
    ),
    "site": (
        DEPLOY / "systemd" / "micromil-site.service",
        "flower-client",
        ["run", "--config", "/etc/micromil/site.yaml"],
    ),
}


# ------------------------------------------------------------------ helpers
def _yaml_files() -> list[Path]:
    return sorted(
        p for p in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
        if not LOCAL_ONLY & set(p.relative_to(DEPLOY).parts[:-1])
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _expand(value: str) -> str:
    """Compose interpolation with an empty environment: ${VAR:-default} -> default."""
    def sub(m: re.Match) -> str:
        assert m.group(2) is not None, f"{value!r}: ${{{m.group(1)}}} has no default"
        return m.group(2)

    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", sub, value)


def _mounts(service: dict) -> list[dict]:
    mounts = service.get("volumes", [])
    # Long syntax only: explicit read_only flags, and missing host folders are errors.
    assert all(isinstance(m, dict) for m in mounts), "use the long volume syntax"
    assert {m["type"] for m in mounts} <= {"bind", "volume"}
    return mounts


def _binds(service: dict) -> dict[str, str]:
    """Container target -> host source relative to deploy/ (normalised, posix)."""
    return {
        m["target"]: posixpath.normpath(_expand(m["source"]))
        for m in _mounts(service) if m["type"] == "bind"
    }


def _in_container(config_at: str, value: str) -> str:
    """A path from a deployment YAML as the container sees it (relative to the YAML)."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(config_at), value))


def _host_of(service: dict, container_path: str) -> str | None:
    """The host path (relative to deploy/) a container path maps to, or None if unmounted."""
    for target, source in _binds(service).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return posixpath.normpath(source + container_path[len(target):])
    return None


def _in_volume(service: dict, container_path: str) -> str | None:
    for m in _mounts(service):
        if m["type"] == "volume" and (container_path + "/").startswith(m["target"].rstrip("/") + "/"):
            return m["source"]
    return None


def _hospital_exec(service: dict) -> list[str]:
    script = service["command"][-1]
    lines = [line.strip() for line in script.splitlines()]
    execs = [line for line in lines if line.startswith("exec ")]
    assert len(execs) == 1, script
    return shlex.split(execs[0])[1:]


def _provision_args() -> list[str]:
    """The `flower-server provision` command in compose.yaml's header comment."""
    lines = [
        line.lstrip("#").strip() for line in (DEPLOY / "compose.yaml").read_text().splitlines()
        if line.startswith("#")
    ]
    for i, line in enumerate(lines):
        if line.startswith("flower-server provision"):
            cmd = line
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + " " + lines[i]
            return shlex.split(cmd)[1:]
    raise AssertionError("compose.yaml does not show its `flower-server provision` command")


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}: keep unit lines unwrapped: {line}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: stray line {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(span: str) -> float:
    """A systemd time span: 60, 60s, 1min, 1min 30s, 2h."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and all(u in units for _, u in parts), f"unsupported time span {span!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= is missing"
    return values[-1]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        candidates = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            excluded = not negate
    return excluded


# ------------------------------------------------------------------ (a) configs load
def test_every_yaml_parses():
    files = _yaml_files()
    assert DEPLOY / "compose.yaml" in files and len(files) >= 7
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_one_shared_experiment():
    cfg = load_config(DEPLOY / "experiment.yaml")
    fed = cfg.federation
    assert (cfg.model.name, fed.rounds, fed.strategy) == ("micromil", 20, "fedavg")
    assert (fed.min_train_sites, fed.round_timeout, cfg.train.num_threads) == (2, 600.0, 1)
    assert not (DEPLOY / "compose" / "experiment.yaml").exists()


@pytest.mark.parametrize("rel", ["federation.yaml", "compose/federation.yaml"])
def test_coordinator_configs_load(rel):
    cfg = load_coordinator_config(DEPLOY / rel)
    assert cfg.experiment == DEPLOY / "experiment.yaml"
    load_config(cfg.experiment)
    assert cfg.superlink.node_auth is True
    for value in (cfg.superlink.ca_cert, cfg.superlink.cert, cfg.superlink.key,
                  cfg.superlink.registered_keys):
        assert cfg.path(value).is_relative_to(DEPLOY / "pki" / "coordinator"), value


@pytest.mark.parametrize("rel", ["site.yaml", *(f"compose/site-{n}.yaml" for n in (1, 2, 3))])
def test_site_configs_load(rel):
    cfg = load_site_config(DEPLOY / rel)
    name = cfg.site.name
    assert name in HOSPITALS
    own = DEPLOY / "pki" / "sites" / name
    assert cfg.path(cfg.superlink.private_key) == own / f"{name}.key"
    assert cfg.path(cfg.superlink.ca_cert) == own / "ca.pem"


# ------------------------------------------------------------------ (b) compose
def test_compose_services(compose):
    assert set(compose["services"]) == {"coordinator", *HOSPITALS}
    for name, svc in compose["services"].items():
        assert svc.get("init") is True, f"{name}: needs an init to forward SIGTERM"
        assert "--insecure" not in str(svc.get("command")), name
    # No named volume is shared: state of one site is never visible to another.
    users: dict[str, list[str]] = {}
    for name, svc in compose["services"].items():
        for m in _mounts(svc):
            if m["type"] == "volume":
                users.setdefault(m["source"], []).append(name)
    assert all(len(v) == 1 for v in users.values()), users
    assert set(users) <= set(compose.get("volumes") or {})


def test_compose_coordinator(compose):
    svc = compose["services"]["coordinator"]
    assert shlex.split(svc["command"]) == [
        "flower-server", "start", "--config", f"{IMAGE_DEPLOY}/compose/federation.yaml",
        "--foreground",
    ]
    cfg = load_coordinator_config(DEPLOY / "compose" / "federation.yaml")
    assert f"{cfg.superlink.port}:{cfg.superlink.port}" in [str(p) for p in svc.get("ports", [])]
    assert cfg.run.expected_sites == len(HOSPITALS)

    binds = _binds(svc)
    assert all(m.get("read_only") is True for m in _mounts(svc) if m["type"] == "bind")
    for source in binds.values():
        assert source not in {".", "..", "pki", "pki/sites"}, source
        assert not source.startswith(("pki/ca", "pki/sites/")), source

    # Every path in its config, seen from inside the container, lands on the right file.
    at = f"{IMAGE_DEPLOY}/compose/federation.yaml"
    assert _host_of(svc, at) == "compose/federation.yaml"
    assert _host_of(svc, _in_container(at, "../experiment.yaml")) == "experiment.yaml"
    sl = cfg.superlink
    for value, host in ((sl.ca_cert, "pki/coordinator/ca.pem"),
                        (sl.cert, "pki/coordinator/server.pem"),
                        (sl.key, "pki/coordinator/server.key"),
                        (sl.registered_keys, "pki/coordinator/registered")):
        assert _host_of(svc, _in_container(at, value)) == host
    for value in (str(cfg.state_dir), cfg.run.out_dir):
        assert value.startswith("/") and _in_volume(svc, value) == "coordinator-state", value


@pytest.mark.parametrize("site", HOSPITALS)
def test_compose_hospital_mounts_only_its_own(compose, site):
    n = site.rsplit("-", 1)[1]
    svc = compose["services"][site]
    at = f"{IMAGE_DEPLOY}/compose/site-{n}.yaml"
    assert _hospital_exec(svc) == ["flower-client", "run", "--config", at]

    mounts = _mounts(svc)
    assert all(m.get("read_only") is True for m in mounts if m["type"] == "bind")
    assert sorted(_binds(svc).values()) == sorted(
        [f"compose/site-{n}.yaml", f"pki/sites/{site}", f"data/{site}"]
    )
    assert [m["source"] for m in mounts if m["type"] == "volume"] == [f"{site}-state"]
    others = set(HOSPITALS) - {site}
    for source in _binds(svc).values():
        assert not any(o in source or f"site-{o[-1]}" in source for o in others), source
        assert not source.startswith("pki/ca"), source

    cfg = load_site_config(DEPLOY / "compose" / f"site-{n}.yaml")
    assert cfg.site.name == site
    assert _host_of(svc, at) == f"compose/site-{n}.yaml"
    assert _host_of(svc, _in_container(at, cfg.superlink.private_key)) == f"pki/sites/{site}/{site}.key"
    assert _host_of(svc, _in_container(at, cfg.superlink.ca_cert)) == f"pki/sites/{site}/ca.pem"
    assert _host_of(svc, _in_container(at, cfg.site.data_path)) == f"data/{site}"
    assert _in_volume(svc, cfg.supernode.state_dir) == f"{site}-state"

    host, _, port = cfg.superlink.address.rpartition(":")
    assert host == "coordinator" and port == "9092"


@pytest.mark.parametrize("site", HOSPITALS)
def test_compose_hospital_restart_waits_out_the_refusal(compose, site):
    svc = compose["services"][site]
    assert svc["restart"] == "unless-stopped"
    assert svc["command"][:2] == ["sh", "-c"]
    script = svc["command"][-1]
    sleeps = [int(s) for s in re.findall(r"\bsleep (\d+)", script)]
    assert sleeps and min(sleeps) >= 60, script
    assert script.index("sleep") < script.index("exec "), "wait before rejoining, not after"


def test_provisioned_keys_each_container_can_read(compose, tmp_path):
    """Provision as compose.yaml says, then list the key files each container would see."""
    args = server_parser().parse_args(_provision_args())
    assert args.command == "provision"
    assert set(args.sites) == set(HOSPITALS)
    pki = tmp_path / "pki"
    provision(pki, args.server_name, args.sites)
    # Hospitals dial coordinator:9092; the certificate must be valid for that name.
    assert "coordinator" in certificate_names(pki / "coordinator" / "server.pem")

    def visible(service: str) -> set[str]:
        seen = set()
        for source in _binds(compose["services"][service]).values():
            if source == "pki" or source.startswith("pki/"):
                root = tmp_path / source
                files = [root] if root.is_file() else root.rglob("*")
                seen |= {p.relative_to(pki).as_posix() for p in files if p.is_file()}
        return seen

    coord = visible("coordinator")
    assert {p for p in coord if p.endswith(".key")} == {"coordinator/server.key"}
    assert {f"coordinator/registered/{s}.pub" for s in HOSPITALS} <= coord
    for site in HOSPITALS:
        seen = visible(site)
        assert {p for p in seen if p.endswith(".key")} == {f"sites/{site}/{site}.key"}
        assert f"sites/{site}/ca.pem" in seen


# ------------------------------------------------------------------ image
def test_dockerfile():
    lines = [
        line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instr = [(line.split()[0].upper(), line) for line in lines if line.split()[0].isupper()]
    assert instr[0][1] == "FROM python:3.11-slim"
    assert 'ARG TORCH_SPEC="torch==2.13.0"' in lines
    assert "WORKDIR /srv/micromil" in lines
    users = [line.split()[1] for kind, line in instr if kind == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert not any(kind == "ENTRYPOINT" for kind, _ in instr)
    text = "\n".join(lines)
    assert text.index("pip install ${TORCH_SPEC}") < text.index("pip install --no-deps .")


def test_build_context_keeps_keys_and_data_out():
    patterns = [
        line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for secret in ("deploy/pki/ca/ca.key", "deploy/pki/sites/hospital-1/hospital-1.key",
                   "deploy/pki/coordinator/server.key", "deploy/pki/coordinator/registered/h.pub",
                   "deploy/data/hospital-1/patients.csv",
                   "deploy/state/superlink.db", "deploy/other.key", ".venv/bin/python",
                   "data/ucsb/site-0/patients.csv", "demo/runs/x.pt"):
        assert _dockerignored(secret, patterns), secret
    copied = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += [s.rstrip("/") for s in line.split()[1:-1] if not s.startswith("--")]
    assert copied
    for needed in [*copied, "micromil_core/__init__.py", "deploy/compose/site-1.yaml"]:
        assert not _dockerignored(needed, patterns), needed


# ------------------------------------------------------------------ (c) systemd
@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_unit(role):
    path, program, argv = UNITS[role]
    unit = _unit(path)
    svc = unit["Service"]
    exec_start = shlex.split(_one(svc, "ExecStart"))
    assert Path(exec_start[0]).name == program and exec_start[0].startswith("/")
    assert exec_start[1:] == argv
    assert _one(svc, "Type") == "simple"
    assert _one(svc, "User") not in {"", "root", "0"}

    assert _one(svc, "Restart") == "on-failure"
    restart_sec = _seconds(_one(svc, "RestartSec"))
    assert restart_sec >= 60, "the SuperLink refuses a killed node for ~50 s"
    # StartLimit* belong in [Unit]; the window must hold `burst` starts RestartSec apart,
    # or the limit never applies.
    burst = int(_one(unit["Unit"], "StartLimitBurst"))
    interval = _seconds(_one(unit["Unit"], "StartLimitIntervalSec"))
    assert burst >= 2 and interval > (burst - 1) * restart_sec
    assert "StartLimitBurst" not in svc and "StartLimitIntervalSec" not in svc

    assert _one(svc, "KillSignal") == "SIGTERM"
    assert _seconds(_one(svc, "TimeoutStopSec")) >= 10
    assert _one(svc, "NoNewPrivileges") == "yes"
    assert _one(svc, "ProtectSystem") == "strict"
    assert _one(svc, "PrivateTmp") == "yes"
    writable = " ".join(svc.get("ReadWritePaths", [])).split()
    assert "/var/lib/micromil" in writable
    if role == "site":
        assert svc.get("PrivateDevices", ["no"])[-1] != "yes", "GPU hospitals need /dev/nvidia*"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (`make test` installs it when run as root)",
)
@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_accepts_unit(role, tmp_path):
    """systemd's own parser reads the unit without a single complaint (unknown keys or
    sections, bad values, a relative ExecStart...). The venv paths are pointed at stub
    programs, since this machine has no /opt/micromil install."""
    path, program, _ = UNITS[role]
    stub = tmp_path / "bin" / program
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / path.name
    unit.write_text(path.read_text().replace("/opt/micromil/venv/bin/", f"{stub.parent}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    # The check itself must be able to fail: a misspelt key is reported.
    unit.write_text(unit.read_text().replace("RestartSec=", "RestartSek="))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert "Unknown key 'RestartSek'" in done.stderr
