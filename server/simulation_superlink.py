"""``micromil simulate`` on Flower's supported path (``simulation.engine: superlink``).

Flower deprecates ``run_simulation``; its supported way to simulate is ``flwr run`` against
a SuperLink in simulation mode. This engine starts a private SuperLink on a free loopback
port (its own FLWR_HOME under ``OUT/.flower``, so it never meets another run's or a
deployed SuperLink), submits the installed app with ``flwr run`` and the experiment as run
config, echoes the coordinator's round lines from ``OUT/server.log``, and stops the
SuperLink when the run ends. The ServerApp and ClientApp are the deployed ones: sites and
privacy settings come from the run config exactly as under ``flwr run . local``.

``simulation.ray_address``: Flower's federation config cannot name a Ray cluster, but its
simulation process calls ``ray.init()``, which joins the cluster in ``RAY_ADDRESS``; the
SuperLink (and so that process) gets it in its environment.

Not here (the in-process engine serves it): a ``grid_tap`` audit hook (the ServerApp runs in
Flower's own process).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from micromil_core.config import ExperimentConfig
from micromil_core.errors import ConfigError, SiteDataError

log = logging.getLogger("micromil.simulate")

CONNECTION = "micromil"  # the SuperLink connection's name in OUT/.flower/home/config.toml
START_TIMEOUT = 60.0  # seconds for the SuperLink to answer its health check
FINISHED = re.compile(r"Finished task \d+ of run (\d+)")

# The app as Flower builds it into a FAB: components and run-config keys only (the code is
# the installed micromil-fl, as in a deployment). Keep in step with pyproject.toml
# [tool.flwr.app] (tests/unit/server/test_simulation_superlink.py checks).
APP_COMPONENTS = {"serverapp": "server.app:app", "clientapp": "client.app:app"}
APP_CONFIG_KEYS = ("config", "data-root", "out-dir", "expected-sites", "connect-timeout", "resume")


def _bin(name: str) -> str:
    """A console script of this environment (flwr, flower-superlink)."""
    return str(Path(sys.executable).with_name(name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_app(folder: Path) -> Path:
    """A minimal Flower app folder (pyproject.toml only) naming the installed components."""
    folder.mkdir(parents=True, exist_ok=True)
    components = "\n".join(f'{k} = "{v}"' for k, v in APP_COMPONENTS.items())
    defaults = {"config": '""', "data-root": '""', "out-dir": '"runs/federation"',
                "expected-sites": "2", "connect-timeout": "300.0", "resume": "false"}
    config = "\n".join(f"{k} = {defaults[k]}" for k in APP_CONFIG_KEYS)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "micromil-fl-simulation"\nversion = "0.1.0"\n'
        'description = "micromil-fl as installed, simulated by micromil simulate"\n'
        'license = "Apache-2.0"\nrequires-python = ">=3.11"\ndependencies = []\n\n'
        f'[tool.flwr.app]\npublisher = "micromil-fl"\n\n[tool.flwr.app.components]\n{components}\n\n'
        f"[tool.flwr.app.config]\n{config}\n"
    )
    return folder


def _environment(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        # the SuperLink starts Flower's other executables (flower-superexec, flwr-simulation)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        # the app runs in this environment: no per-run `uv sync` of its dependencies
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # SuperExec looks for the submitted run every 0.1 s, not Flower's 1 s: a poll is a
        # loopback HTTP call, and the run is this SuperLink's only one
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"),
    }


def _launch_superlink(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """A SuperLink in simulation mode on a free loopback port (not yet waited for)."""
    port = _free_port()
    cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(port), "--log-file", str(work / "superlink.log")]
    with open(work / "superlink.out", "ab") as out:  # the child keeps its own copy
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def _wait_healthy(proc: subprocess.Popen, port: int, work: Path) -> None:
    """Until the SuperLink answers its health check."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per health probe
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SiteDataError(f"flower-superlink exited with code {proc.returncode}; see {work / 'superlink.out'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SiteDataError(f"flower-superlink did not answer within {START_TIMEOUT:.0f} s; see {work / 'superlink.out'}")


def _stop(proc: subprocess.Popen, marker: str = "", term_wait: float = 15.0) -> None:
    """``proc``, everything in its process group, and every process whose environment holds
    ``marker`` (``FLWR_HOME=<this run's>``: what the SuperLink started, SuperExec,
    flwr-simulation and the Ray that flwr-simulation started, whose processes need not stay
    in the group: a clean-clone run found one alive after the group had gone), so an
    interrupted run leaves nothing behind: SIGTERM, then SIGKILL to whatever is still alive
    after ``term_wait`` s."""
    import signal

    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
        for pid in {proc.pid, *_left_behind(proc.pid, marker)}:
            try:
                if pid == proc.pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader
            if proc.returncode is not None and not _left_behind(proc.pid, marker):
                return
            time.sleep(0.1)


def _left_behind(group: int, marker: str = "") -> list[int]:
    """Live (not zombie) processes in process group ``group`` or, given a ``marker``, with it
    in their environment (Linux /proc; elsewhere none: the leader's exit is all there is to
    wait for)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state, _parent, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if state == "Z":
                continue
            if int(pgrp) == group or (marker and marker.encode() in (entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _submit(app: Path, home: Path, port: int, env: dict[str, str], run_config: dict[str, Any],
            federation: dict[str, Any]) -> str:
    """``flwr run`` the app on the private SuperLink; returns the run id."""
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    rc = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    fc = " ".join(f"{k}={_toml_value(v)}" for k, v in federation.items())
    done = subprocess.run(
        [_bin("flwr"), "run", str(app), CONNECTION, "--run-config", rc, "--federation-config", fc],
        env=env, capture_output=True, text=True, timeout=300,
    )
    found = re.search(r"Successfully started run (\d+)", done.stdout)
    if done.returncode != 0 or not found:
        raise SiteDataError(f"flwr run could not start the simulation:\n{done.stdout}{done.stderr}")
    return found.group(1)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Follower:
    """The complete lines a growing text file gained since the last call (a line still
    being written waits for the next call)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, path.stat().st_size if path.exists() else 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        return whole.decode("utf-8", errors="replace").splitlines()

    def echo(self) -> None:
        for line in self.new_lines():
            print(line, file=sys.stderr, flush=True)


def _wait_for(run_id: str, work: Path, superlink: subprocess.Popen, follower: _Follower) -> None:
    """Until the SuperLink says the run's task finished (or the SuperLink dies)."""
    superlink_log = _Follower(work / "superlink.log")  # read once, not whole at every poll
    while True:
        follower.echo()
        if superlink.poll() is not None:
            raise SiteDataError(f"the SuperLink stopped during the run; see {work / 'superlink.out'}")
        if any(run_id in FINISHED.findall(line) for line in superlink_log.new_lines()):
            follower.echo()
            return
        time.sleep(0.5)


class PrivateSuperLink:
    """A SuperLink in simulation mode for one ``micromil simulate`` run; started first so it
    comes up while the pre-flight checks run, stopped when the run ends or fails."""

    def __init__(self, out: Path, ray_address: str = "") -> None:
        self.out, self.work = out, out / ".flower"
        self.home = self.work / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = _environment(self.home)
        if ray_address:  # the cluster Flower's ray.init() joins (see the module docstring)
            self.env["RAY_ADDRESS"] = ray_address
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> PrivateSuperLink:
        self.proc, self.port = _launch_superlink(self.work, self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, f"FLWR_HOME={self.home}")

    def run(self, cfg: ExperimentConfig, n_sites: int, resume: bool) -> dict[str, Any]:
        """Run the experiment with ``flwr run``; returns the held-out metrics the ServerApp
        wrote to ``OUT/metrics.json``."""
        sim = cfg.simulation
        out = self.out
        experiment = out / "experiment.yaml"  # what the ServerApp and the sites read
        experiment.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        metrics = out / "metrics.json"
        before = metrics.stat().st_mtime_ns if metrics.exists() else None
        _wait_healthy(self.proc, self.port, self.work)
        follower = _Follower(out / "server.log")
        run_id = _submit(
            write_app(self.work / "app"), self.home, self.port, self.env,
            {"config": str(experiment), "data-root": str(Path(str(sim.data_root)).resolve()),
             "out-dir": str(out.resolve()), "resume": bool(resume)},
            {"num-supernodes": n_sites, "client-resources-num-cpus": int(sim.cpus_per_site),
             "client-resources-num-gpus": float(sim.gpus_per_site)},
        )
        log.info("run %s started on Flower's SuperLink (127.0.0.1:%d; its log: %s)", run_id,
                 self.port, self.work / "superlink.log")
        _wait_for(run_id, self.work, self.proc, follower)
        if not metrics.exists() or metrics.stat().st_mtime_ns == before:
            raise SiteDataError(f"the federation ended without a result; see {out / 'server.log'} "
                                f"and {self.work / 'superlink.out'}")
        return json.loads(metrics.read_text())


def check_engine(cfg: ExperimentConfig) -> None:
    """Settings this engine cannot honour, refused before anything starts."""
    sim = cfg.simulation
    if sim.cpus_per_site != int(sim.cpus_per_site):
        raise ConfigError(f"simulation.cpus_per_site={sim.cpus_per_site}: Flower's federation "
                          "config takes whole CPUs; use an integer or simulation.engine: in-process")
