"""Deployment helpers without starting processes: PKI, config files, command lines."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import tomllib
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from micromil_core.deploy.config import load_coordinator_config, load_site_config
from micromil_core.deploy.coordinator import Coordinator, superlink_security
from micromil_core.deploy.pki import certificate_names, make_site_key, provision, read_public_key
from micromil_core.deploy.site import (
    check_site_data,
    node_config,
    supernode_command,
    worker_command,
    worker_secret,
)
from micromil_core.errors import ConfigError, SiteDataError
from server.cli import main as flower_server
from tests.conftest import write_site

ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture
def pki(tmp_path):
    provision(tmp_path / "pki", ["coord.example.org", "10.1.2.3"], ["h1", "h2"])
    return tmp_path / "pki"


def _coordinator_yaml(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "exp.yaml").write_text("model: {name: abmil}\n")
    raw = {"experiment": "exp.yaml", "state_dir": "state",
           "superlink": {"host": "127.0.0.1", "port": 9555}, **overrides}
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_provision_layout_permissions_and_names(pki):
    for rel in ("ca/ca.key", "ca/ca.pem", "coordinator/server.pem", "coordinator/server.key",
                "coordinator/registered/h1.pub", "sites/h2/h2.key", "sites/h2/ca.pem"):
        assert (pki / rel).is_file(), rel
    for key in ("ca/ca.key", "coordinator/server.key", "sites/h1/h1.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600, key
    names = certificate_names(pki / "coordinator" / "server.pem")
    assert {"coord.example.org", "10.1.2.3", "localhost", "127.0.0.1"} <= set(names)
    assert read_public_key(pki / "sites" / "h1" / "h1.pub").startswith("ecdsa-sha2-nistp384 ")
    # The registered copy is the hospital's own public key.
    assert (pki / "coordinator/registered/h1.pub").read_bytes() == (pki / "sites/h1/h1.pub").read_bytes()
    # The coordinator's folder holds no hospital private key and not the CA key.
    assert sorted(p.name for p in (pki / "coordinator").rglob("*.key")) == ["server.key"]


def test_provision_again_keeps_keys_and_adds_sites(pki):
    before = {p: p.read_bytes() for p in pki.rglob("*.key")}
    result = provision(pki, ["coord.example.org"], ["h1", "h2", "h3"])
    assert {p.name for p in result.created} == {"h3.key", "h3.pub"}
    assert all(p.read_bytes() == data for p, data in before.items())
    renewed = provision(pki, ["new.example.org"], [], renew_server=True)
    assert "new.example.org" in certificate_names(pki / "coordinator" / "server.pem")
    assert (pki / "ca" / "ca.key").read_bytes() == before[pki / "ca" / "ca.key"]
    assert {p.name for p in renewed.created} == {"server.key", "server.pem"}


def test_provision_refuses_bad_input(tmp_path, pki):
    with pytest.raises(ConfigError, match="site name 'bad/name'"):
        provision(tmp_path / "x", ["c"], ["bad/name"])
    with pytest.raises(ConfigError, match="DNS name"):
        provision(tmp_path / "y", [], ["h1"])
    (pki / "ca" / "ca.pem").unlink()
    with pytest.raises(ConfigError, match="only one of ca.key/ca.pem"):
        provision(pki, ["c"], ["h1"])
    with pytest.raises(ConfigError, match="refusing to replace"):
        make_site_key(pki / "sites" / "h1", "h1")


def test_public_key_must_be_ecdsa_p384(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "k.pub"
    path.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ConfigError, match="ECDSA P-384"):
        read_public_key(path)
    path.write_text("not a key")
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        read_public_key(path)


def test_coordinator_config_resolves_paths_and_names_errors(tmp_path):
    cfg = load_coordinator_config(_coordinator_yaml(tmp_path, run={"expected_sites": 4}))
    assert cfg.experiment == tmp_path / "exp.yaml"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.out_dir == tmp_path / "runs" / "federation"
    assert cfg.path(cfg.superlink.cert) == tmp_path / "pki" / "coordinator" / "server.pem"
    with pytest.raises(ConfigError, match=r"federation.yaml: unknown key\(s\) superlnk"):
        load_coordinator_config(_coordinator_yaml(tmp_path, superlnk={}))
    with pytest.raises(ConfigError, match="superlink.port=70000"):
        load_coordinator_config(_coordinator_yaml(tmp_path, superlink={"port": 70000}))
    with pytest.raises(ConfigError, match="run.resume='maybe'"):
        load_coordinator_config(_coordinator_yaml(tmp_path, run={"resume": "maybe"}))
    path = _coordinator_yaml(tmp_path, experiment="missing.yaml")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        load_coordinator_config(path)
    # The experiment itself is validated here, not first in Flower's server process.
    path = _coordinator_yaml(tmp_path)
    (tmp_path / "exp.yaml").write_text("model: {name: abmil}\ntrain: {lr: -1}\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_coordinator_config(path)


def test_coordinator_needs_an_absolute_existing_initial_model(tmp_path):
    # The ServerApp runs in Flower's own process and folder: a relative path would be
    # read from somewhere else, so the coordinator refuses it before starting anything.
    path = _coordinator_yaml(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text("model: {name: abmil}\nfederation: {initial_model: public/model.pt}\n")
    with pytest.raises(ConfigError, match=r"must be an absolute path .* e\.g\. .*public/model\.pt"):
        load_coordinator_config(path)
    exp.write_text(f"model: {{name: abmil}}\nfederation: {{initial_model: {tmp_path / 'none.pt'}}}\n")
    with pytest.raises(ConfigError, match="none.pt not found on the coordinator"):
        load_coordinator_config(path)
    (tmp_path / "none.pt").write_bytes(b"x")  # contents are checked when the run starts
    assert load_coordinator_config(path).experiment == exp


def test_superlink_command_secure_by_default(tmp_path, pki):
    cfg_path = _coordinator_yaml(tmp_path, superlink={
        "port": 9555, "ca_cert": str(pki / "coordinator/ca.pem"),
        "cert": str(pki / "coordinator/server.pem"), "key": str(pki / "coordinator/server.key"),
        "registered_keys": str(pki / "coordinator/registered")})
    coord = Coordinator(load_coordinator_config(cfg_path))
    coord.check()
    cmd = coord.superlink_command()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database"):
        assert flag in cmd
    assert "--insecure" not in cmd
    assert sorted(coord.registered_keys()) == ["h1", "h2"]
    insecure = Coordinator(load_coordinator_config(cfg_path), insecure=True).superlink_command()
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "--disable-runtime-dependency-installation" in insecure


def test_coordinator_check_names_missing_files(tmp_path):
    coord = Coordinator(load_coordinator_config(_coordinator_yaml(tmp_path)))
    with pytest.raises(ConfigError, match="superlink.cert: .*server.pem.*flower-server provision"):
        coord.check()


def test_start_insecure_warns_before_anything_starts(tmp_path, capsys, monkeypatch):
    def refuse(self, **kwargs):
        raise ConfigError("stop here")

    monkeypatch.setattr(Coordinator, "start_superlink", refuse)
    assert flower_server(["start", "--config", str(_coordinator_yaml(tmp_path)), "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "WARNING: --insecure" in err and "stop here" in err


def _staged_config(app: Path) -> dict:
    return tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_staged_app_run_config_matches_the_project(tmp_path):
    coord = Coordinator(load_coordinator_config(_coordinator_yaml(tmp_path)))
    coord.paths.root.mkdir(parents=True)
    coord.paths.sites.write_text('{"h1": "123"}')
    app = coord.stage_app(resume=True)
    staged = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    # The ServerApp reads these keys; site-nodes exists only in a deployment with node auth.
    assert set(staged["config"]) | {"site-nodes"} == set(project["config"]) | {"site-nodes"}
    assert staged["components"] == project["components"]
    assert staged["config"]["resume"] is True
    assert staged["config"]["config"] == str(tmp_path / "exp.yaml")
    for package in ("micromil_core", "server", "client"):
        assert (app / package / "__init__.py").is_file()
    assert not list(app.rglob("__pycache__"))


def _site_yaml(tmp_path: Path, pki: Path, **site) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({
        "site": {"name": "h1", "data_path": "data/h1", "role": "train", **site},
        "superlink": {"address": "coord.example.org:9092",
                      "ca_cert": str(pki / "sites/h1/ca.pem"),
                      "private_key": str(pki / "sites/h1/h1.key")},
        "supernode": {"port": 9400, "state_dir": "state"},
    }))
    return path


def test_site_config_and_supernode_command(tmp_path, pki):
    cfg = load_site_config(_site_yaml(tmp_path, pki))
    assert cfg.path(cfg.site.data_path) == tmp_path / "data" / "h1"
    cmd = supernode_command(cfg)
    assert cmd[cmd.index("--superlink") + 1] == "coord.example.org:9092"
    assert cmd[cmd.index("--root-certificates") + 1] == str(pki / "sites/h1/ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(pki / "sites/h1/h1.key")
    assert "--insecure" not in cmd
    # TOML values: strings quoted, so paths with spaces survive.
    assert node_config(cfg) == (
        f'site-name="h1" data-path="{tmp_path / "data" / "h1"}" role="train" '
        f'state-dir="{tmp_path / "state"}"'
    )
    assert "--insecure" in supernode_command(cfg, insecure=True)


def test_process_isolation_runs_a_worker_that_shares_a_private_secret(tmp_path, pki):
    cfg = load_site_config(_site_yaml(tmp_path, pki))
    assert cfg.supernode.isolation == "process"  # the default: one warm ClientApp process
    secret = worker_secret(cfg)
    assert secret.parent == tmp_path / "state" and secret.stat().st_mode & 0o777 == 0o600
    first = secret.read_bytes()
    assert len(first) == 32 and worker_secret(cfg).read_bytes() != first  # fresh per start
    cmd = supernode_command(cfg, secret_file=secret)
    assert cmd[1:5] == ["-m", "client.supernode", "--pull-interval", "0.5"]  # Flower's, polling sooner
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(secret)
    worker = worker_command(cfg, secret)
    assert worker[1:3] == ["-m", "client.worker"]
    assert worker[worker.index("--runtime-api-address") + 1] == f"127.0.0.1:{cfg.supernode.port}"
    assert worker[worker.index("--superexec-auth-secret-file") + 1] == str(secret)

    raw = yaml.safe_load((tmp_path / "site.yaml").read_text())
    raw["supernode"] = {"isolation": "subprocess", "pull_interval": 0}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    cmd = supernode_command(load_site_config(tmp_path / "site.yaml"))
    assert cmd[cmd.index("--isolation") + 1] == "subprocess" and "--superexec-auth-secret-file" not in cmd
    assert Path(cmd[0]).name == "flower-supernode"  # pull_interval 0: Flower's program as shipped
    raw["supernode"] = {"pull_interval": 5}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"supernode.pull_interval=5.0 is invalid: expected seconds in \[0, 3\]"):
        load_site_config(tmp_path / "site.yaml")
    raw["supernode"] = {"isolation": "thread"}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="supernode.isolation='thread' is invalid: expected one of process, subprocess"):
        load_site_config(tmp_path / "site.yaml")


def test_site_config_errors(tmp_path, pki):
    with pytest.raises(ConfigError, match="site.role='test'"):
        load_site_config(_site_yaml(tmp_path, pki, role="test"))
    with pytest.raises(ConfigError, match="site.name='h 1'"):
        load_site_config(_site_yaml(tmp_path, pki, name="h 1"))
    path = _site_yaml(tmp_path, pki)
    raw = yaml.safe_load(path.read_text())
    raw["superlink"]["address"] = "coord.example.org"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="expected host:port"):
        load_site_config(path)
    raw["superlink"]["address"] = "c:1"
    raw["superlink"]["ca_cert"] = "nowhere/ca.pem"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="superlink.ca_cert: .*nowhere/ca.pem"):
        supernode_command(load_site_config(path))


def test_site_data_checked_before_joining(tmp_path, pki):
    cfg = load_site_config(_site_yaml(tmp_path, pki))
    (tmp_path / "data" / "h1").mkdir(parents=True)
    (tmp_path / "data" / "h1" / "patients.csv").write_text("patient_id,label\np1,pos\n")
    with pytest.raises(SiteDataError, match="fix them before joining"):
        check_site_data(cfg)


def test_flower_client_check_reports_a_good_site(tmp_path, pki, capsys):
    from client.cli import main as flower_client

    site = write_site(tmp_path / "data" / "h1", n_patients=6)
    assert flower_client(["check", "--config", str(_site_yaml(tmp_path, pki))]) == 0
    out = capsys.readouterr().out
    assert ": OK" in out and "patients: 6" in out
    (site / "features" / "p000.pt").unlink()
    assert flower_client(["check", "--config", str(_site_yaml(tmp_path, pki))]) == 2
    assert "fix them before joining" in capsys.readouterr().err


def test_staged_app_binds_each_node_id_to_its_registered_site(tmp_path):
    coord = Coordinator(load_coordinator_config(_coordinator_yaml(tmp_path)))
    coord.paths.root.mkdir(parents=True)
    coord.paths.sites.write_text('{"hospital-1": "123", "hospital-2": "6690383732161276304"}')
    text = (coord.stage_app(resume=False) / "pyproject.toml").read_text()
    # A JSON object in a TOML string, quoted like the other values.
    assert 'site-nodes = "{\\"123\\": \\"hospital-1\\", \\"6690383732161276304\\": \\"hospital-2\\"}"' in text
    value = _staged_config(coord.paths.app)["site-nodes"]
    assert json.loads(value) == {"123": "hospital-1", "6690383732161276304": "hospital-2"}

    # No node authentication: names cannot be bound to keys, so there is no binding.
    insecure = Coordinator(load_coordinator_config(_coordinator_yaml(tmp_path)), insecure=True)
    assert "site-nodes" not in _staged_config(insecure.stage_app(resume=False))
    no_auth = tmp_path / "no-auth"
    no_auth.mkdir()
    cfg = load_coordinator_config(_coordinator_yaml(no_auth, superlink={"node_auth": False}))
    assert "site-nodes" not in _staged_config(Coordinator(cfg).stage_app(resume=False))


def test_staged_app_refuses_a_site_whose_node_id_was_lost(tmp_path):
    # register_sites keeps "" for a key the SuperLink database already holds ("Public key
    # already in use") when sites.json no longer knows its node id.
    coord = Coordinator(load_coordinator_config(_coordinator_yaml(tmp_path)))
    coord.paths.root.mkdir(parents=True)
    coord.paths.sites.write_text('{"hospital-1": "123", "hospital-2": ""}')
    with pytest.raises(ConfigError, match=(
        r"node id of hospital-2 is unknown: .*superlink.db already holds their keys .*"
        r"`flower-server stop .*delete .*superlink.db and .*sites.json.*register every hospital afresh"
    )):
        coord.stage_app(resume=False)
    coord.paths.sites.unlink()
    with pytest.raises(ConfigError, match="no registered hospitals in .*sites.json"):
        coord.stage_app(resume=False)


def test_security_is_read_from_the_running_superlinks_command_line(tmp_path, monkeypatch, capsys):
    secure = ["python", "flower-superlink", "--ssl-ca-certfile", "ca.pem", "--enable-supernode-auth"]
    assert superlink_security(secure) == {"tls": True, "node_auth": True}
    assert superlink_security(["flower-superlink", "--ssl-certfile", "s.pem"]) == {"tls": True, "node_auth": False}
    assert superlink_security(["flower-superlink", "--insecure"]) == {"tls": False, "node_auth": False}
    assert superlink_security(None) == {"tls": None, "node_auth": None}

    import micromil_core.deploy.coordinator as coordinator

    config = _coordinator_yaml(tmp_path)  # says TLS + node auth; the process is what counts
    cmdline = [str(a) for a in Coordinator(load_coordinator_config(config), insecure=True).superlink_command()]
    monkeypatch.setattr(Coordinator, "running_pid", lambda self: 4242)
    monkeypatch.setattr(coordinator, "_cmdline", lambda pid: cmdline if pid == 4242 else None)
    monkeypatch.setattr(coordinator, "flwr_json", lambda args, env, timeout=60: {"nodes": []})
    status = Coordinator(load_coordinator_config(config)).status()
    assert status["security"] == {"tls": False, "node_auth": False}

    assert flower_server(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "security: TLS OFF, node authentication OFF" in out
    assert "WARNING: the SuperLink runs --insecure" in out
    cmdline = [str(a) for a in Coordinator(load_coordinator_config(config)).superlink_command()]
    assert flower_server(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "security: TLS on, node authentication on" in out and "WARNING" not in out
    assert flower_server(["status", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["security"] == {"tls": True, "node_auth": True}


def test_supernode_retry_settings(tmp_path, pki):
    cfg = load_site_config(_site_yaml(tmp_path, pki))
    sn = cfg.supernode
    assert (sn.retry_backoff, sn.retry_backoff_max, sn.max_activation_retries) == (60.0, 600.0, 0)
    for values, error in (
        ({"retry_backoff": 0}, r"supernode.retry_backoff=0.0 is invalid: expected seconds > 0 .*about 50 s"),
        ({"retry_backoff": 120, "retry_backoff_max": 60},
         r"supernode.retry_backoff_max=60.0 is invalid: expected >= supernode.retry_backoff \(120"),
        ({"max_activation_retries": -1}, r"supernode.max_activation_retries=-1 is invalid: expected 0"),
        ({"max_activation_retries": "often"}, r"supernode.max_activation_retries='often' is invalid"),
    ):
        path = _site_yaml(tmp_path, pki)
        raw = yaml.safe_load(path.read_text())
        raw["supernode"].update(values)
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=error):
            load_site_config(path)
