"""The coordinator's side: start a secured SuperLink, admit registered hospitals, submit
the MicroMIL run, follow it, report status and stop.

Everything lives under the config's ``state_dir``: the SuperLink database (so node
registrations and runs survive a restart), its log, its pid, the Flower CLI's home with
the connection to this SuperLink, the staged app and the id of the current run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from micromil_core.deploy.config import CoordinatorConfig, require_files
from micromil_core.deploy.flower_cli import FlowerCommandError, flower_env, flwr_json, program
from micromil_core.deploy.pki import check_site_name, read_public_key
from micromil_core.errors import ConfigError
from micromil_core.io import atomic_path, write_json_atomic

CONNECTION = "micromil"  # name of the SuperLink connection in the Flower CLI's config
APP_PACKAGES = ("micromil_core", "server", "client")
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no node authentication. Model updates travel in clear "
    "text and any machine that reaches this port can join. Use only on a closed test network."
)


class StatePaths:
    """Files of one coordinator under its ``state_dir``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.database = root / "superlink.db"
        self.log = root / "superlink.log"
        self.pid = root / "superlink.pid"
        self.flwr_home = root / "flwr-home"
        self.sites = root / "sites.json"  # site name -> node id, from registration
        self.run = root / "run.json"  # the current run's id
        self.app = root / "app" / "micromil-fl"


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, *, insecure: bool = False) -> None:
        self.cfg = cfg
        self.insecure = insecure
        self.paths = StatePaths(cfg.state_dir)
        sl = cfg.superlink
        self.tls = {
            "superlink.ca_cert": cfg.path(sl.ca_cert),
            "superlink.cert": cfg.path(sl.cert),
            "superlink.key": cfg.path(sl.key),
        }

    # ------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.paths.flwr_home)

    @property
    def node_auth(self) -> bool:
        return self.cfg.superlink.node_auth and not self.insecure

    def check(self) -> None:
        """Fail before anything starts if a certificate, key or the key folder is missing."""
        if not self.insecure:
            require_files(self.cfg.source, self.tls)
        if self.node_auth:
            self.registered_keys()

    def registered_keys(self) -> dict[str, Path]:
        folder = self.cfg.path(self.cfg.superlink.registered_keys)
        keys = {p.stem: p for p in sorted(folder.glob("*.pub"))} if folder.is_dir() else {}
        if not keys:
            raise ConfigError(
                f"{self.cfg.source}: no hospital public keys in {folder} (superlink."
                "registered_keys); run `flower-server provision --sites ...` or copy each "
                "hospital's <site>.pub there"
            )
        for name, path in keys.items():
            check_site_name(name)
            read_public_key(path)
        return keys

    def superlink_command(self) -> list[str]:
        sl = self.cfg.superlink
        cmd = [
            program("flower-superlink"),
            "--host", sl.host, "--port", str(sl.port),
            "--database", str(self.paths.database),
            # The coordinator runs the app from the installed packages: never `uv sync`
            # torch and friends for each run (flower-superlink 1.41 --help).
            "--disable-runtime-dependency-installation",
        ]
        if self.insecure:
            return [*cmd, "--insecure"]
        cmd += [
            "--ssl-ca-certfile", str(self.tls["superlink.ca_cert"]),
            "--ssl-certfile", str(self.tls["superlink.cert"]),
            "--ssl-keyfile", str(self.tls["superlink.key"]),
        ]
        return [*cmd, "--enable-supernode-auth"] if self.node_auth else cmd

    def write_connection(self) -> Path:
        """The Flower CLI's connection to this SuperLink, always over loopback."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.cfg.superlink.port}"']
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls["superlink.ca_cert"]}"')
        path = self.paths.flwr_home / "config.toml"
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        return path

    # ------------------------------------------------------------ SuperLink process
    def running_pid(self) -> int | None:
        try:
            pid = int(self.paths.pid.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_superlink(pid) else None

    def start_superlink(self, *, foreground: bool = False) -> subprocess.Popen:
        pid = self.running_pid()
        if pid is not None:
            raise ConfigError(
                f"a SuperLink from {self.paths.root} is already running (pid {pid}); "
                "see `flower-server status`, or `flower-server stop` first"
            )
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.write_connection()
        logfile = open(self.paths.log, "ab")
        proc = subprocess.Popen(
            self.superlink_command(), stdout=logfile, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=not foreground,
        )
        logfile.close()
        with atomic_path(self.paths.pid) as tmp:
            tmp.write_text(f"{proc.pid}\n")
        return proc

    def wait_until_ready(self, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise FlowerCommandError(
                    f"the SuperLink exited at start (code {proc.returncode}); its log "
                    f"{self.paths.log} ends with:\n{_tail(self.paths.log)}"
                )
            try:
                flwr_json(["supernode", "ls", CONNECTION], self.env, timeout=20)
                return
            except (FlowerCommandError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise FlowerCommandError(
                        f"the SuperLink did not answer within {timeout:.0f} s; see {self.paths.log}"
                    ) from None
                time.sleep(0.5)

    def register_sites(self) -> dict[str, str]:
        """Register every hospital key with the SuperLink (idempotent); name -> node id."""
        known = self.known_sites()
        for name, path in self.registered_keys().items():
            try:
                out = flwr_json(
                    ["supernode", "register", str(path), CONNECTION, "--name", name], self.env
                )
                known[name] = str(out["node-id"])
            except FlowerCommandError as exc:
                if "already in use" not in str(exc):
                    raise
                known.setdefault(name, "")  # registered in an earlier start
        write_json_atomic(self.paths.sites, known)
        return known

    def known_sites(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.paths.sites.read_text()))
        except (OSError, ValueError):
            return {}

    def site_nodes(self) -> dict[str, str]:
        """Node id -> the site name its key was registered under: the ServerApp refuses a
        node that calls itself by another name (a SuperNode's site-name is self-declared)."""
        sites = self.known_sites()
        if not sites:
            raise ConfigError(
                f"no registered hospitals in {self.paths.sites}: `flower-server start` registers "
                f"the keys in {self.cfg.path(self.cfg.superlink.registered_keys)} before it "
                "submits the run"
            )
        unknown = sorted(name for name, node in sites.items() if not node)
        if unknown:
            raise ConfigError(
                f"the node id of {', '.join(unknown)} is unknown: the SuperLink database "
                f"{self.paths.database} already holds their keys (registered in an earlier start) "
                f"but {self.paths.sites}, which binds each key's node to its site name, was lost. "
                f"Stop the SuperLink (`flower-server stop --config {self.cfg.source}`), delete "
                f"{self.paths.database} and {self.paths.sites}, and start again to register "
                "every hospital afresh (checkpoints in run.out_dir are kept)"
            )
        ids = {node: name for name, node in sites.items()}
        if len(ids) < len(sites):
            raise ConfigError(f"{self.paths.sites} binds one node id to several sites: {sites}")
        return ids

    # ------------------------------------------------------------ the run
    def stage_app(self, resume: bool) -> Path:
        """A minimal Flower app project: the installed packages plus this run's config.

        Built from the installed code (not the working directory), so a pip-installed
        coordinator works and what runs is exactly what the hospitals have installed.
        """
        app = self.paths.app
        tmp = app.with_name(app.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for package in APP_PACKAGES:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise FlowerCommandError(f"package {package} is not installed; reinstall micromil-fl")
            src = Path(next(iter(spec.submodule_search_locations)))
            shutil.copytree(src, tmp / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        run = self.cfg.run
        values = {
            "config": str(self.cfg.experiment),
            "out-dir": str(self.cfg.out_dir),
            "expected-sites": run.expected_sites,
            "connect-timeout": float(run.wait_for_sites),
            "resume": resume,
            "data-root": "",  # a deployment's sites are real hospitals, never a data root
        }
        if self.node_auth:
            values["site-nodes"] = json.dumps(self.site_nodes(), sort_keys=True)
        config_lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        (tmp / "pyproject.toml").write_text(
            "\n".join([
                "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
                "[project]", 'name = "micromil-fl"', f'version = "{_version()}"',
                'description = "Federated MicroMIL (staged by flower-server start)"', "",
                "[tool.flwr.app]", 'publisher = "micromil-fl"', "",
                "[tool.flwr.app.components]", 'serverapp = "server.app:app"',
                'clientapp = "client.app:app"', "", "[tool.flwr.app.config]", *config_lines, "",
            ])
        )
        shutil.rmtree(app, ignore_errors=True)
        tmp.rename(app)
        return app

    def submit(self, resume: bool) -> str:
        app = self.stage_app(resume)
        out = flwr_json(["run", str(app), CONNECTION], self.env, timeout=300)
        run_id = str(out["run-id"])
        write_json_atomic(self.paths.run, {"run_id": run_id, "out_dir": str(self.cfg.out_dir),
                                           "submitted": time.time(), "resume": resume})
        return run_id

    def current_run(self) -> str | None:
        try:
            return str(json.loads(self.paths.run.read_text())["run_id"])
        except (OSError, ValueError, KeyError):
            return None

    def run_status(self, run_id: str) -> dict[str, Any]:
        out = flwr_json(["ls", CONNECTION, "--run-id", run_id], self.env)
        runs = out.get("runs", [])
        return runs[0] if runs else {}

    def follow(self, run_id: str, poll: float = 2.0) -> str:
        """Stream the run's log to stdout until it finishes; return its final status."""
        stream = subprocess.Popen(
            [program("flwr"), "log", run_id, CONNECTION, "--stream"], env=self.env,
        )
        try:
            while True:
                status = str(self.run_status(run_id).get("status", ""))
                if status.startswith("finished"):
                    time.sleep(poll)  # let the last lines arrive
                    return status
                time.sleep(poll)
        finally:
            stream.terminate()
            try:
                stream.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stream.kill()

    # ------------------------------------------------------------ status and stop
    def status(self) -> dict[str, Any]:
        pid = self.running_pid()
        info: dict[str, Any] = {"superlink": {"running": pid is not None, "pid": pid,
                                              "log": str(self.paths.log)}}
        if pid is None:
            return info
        info["security"] = superlink_security(_cmdline(pid))
        names = {v: k for k, v in self.known_sites().items() if v}
        nodes = flwr_json(["supernode", "ls", CONNECTION], self.env).get("nodes", [])
        info["sites"] = [
            {"site": names.get(str(n["node-id"]), f"node {n['node-id']}"), "status": n["status"],
             "online_since": n.get("online-at"), "offline_since": n.get("offline-at")}
            for n in nodes
        ]
        run_id = self.current_run()
        if run_id:
            run = self.run_status(run_id)
            info["run"] = {"run_id": run_id, "status": run.get("status"),
                           "elapsed_s": run.get("elapsed"), "out_dir": str(self.cfg.out_dir)}
        return info

    def stop(self, timeout: float = 20.0) -> list[str]:
        done: list[str] = []
        pid = self.running_pid()
        if pid is None:
            return ["no SuperLink running"]
        run_id = self.current_run()
        if run_id:
            try:
                if not str(self.run_status(run_id).get("status", "")).startswith("finished"):
                    flwr_json(["stop", run_id, CONNECTION], self.env)
                    done.append(f"run {run_id} stopped")
            except FlowerCommandError as exc:
                done.append(f"run {run_id}: {exc}")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_superlink(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_superlink(pid):
            os.kill(pid, signal.SIGKILL)
        self.paths.pid.unlink(missing_ok=True)
        done.append(f"SuperLink (pid {pid}) stopped")
        return done


def superlink_security(cmdline: list[str] | None) -> dict[str, bool | None]:
    """TLS and node authentication of a SuperLink, from the flags it was started with
    (flower-superlink 1.41: ``--insecure`` turns TLS off, ``--enable-supernode-auth``
    admits only registered keys). None where the command line cannot be read."""
    if cmdline is None:
        return {"tls": None, "node_auth": None}
    return {"tls": "--insecure" not in cmdline, "node_auth": "--enable-supernode-auth" in cmdline}


def _cmdline(pid: int) -> list[str] | None:
    """The arguments the process was started with: what the running SuperLink does, even if
    the config file was edited since."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_superlink(pid: int) -> bool:
    """True if ``pid`` is alive and is a SuperLink (a stale pid file may name another process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid
    if b"flower-superlink" not in cmdline:
        return False
    try:  # a zombie has a cmdline until reaped
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _version() -> str:
    try:
        return importlib.metadata.version("micromil-fl")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
