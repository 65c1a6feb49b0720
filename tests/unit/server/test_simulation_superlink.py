"""``simulation.engine: superlink``'s pieces that need no SuperLink (the run itself:
tests/integration/test_simulation.py)."""

import time
from pathlib import Path

import pytest
import tomllib

import server.simulation_superlink as sl
from micromil_core.config import build_config
from micromil_core.errors import ConfigError
from server.simulation_superlink import APP_COMPONENTS, APP_CONFIG_KEYS, check_engine, write_app

ROOT = Path(__file__).resolve().parents[3]


def test_the_generated_app_is_the_projects_flower_app(tmp_path):
    # The FAB micromil simulate submits names the same components and run-config keys as
    # the project's own [tool.flwr.app] (what `flwr run .` submits).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    app = tomllib.loads((write_app(tmp_path / "app") / "pyproject.toml").read_text())
    assert app["tool"]["flwr"]["app"]["components"] == project["components"] == APP_COMPONENTS
    assert app["tool"]["flwr"]["app"]["config"] == project["config"]
    assert tuple(project["config"]) == APP_CONFIG_KEYS


def test_the_private_superlink_polls_for_its_run_quickly_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    env = sl._environment(tmp_path)
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1" and env["FLWR_HOME"] == str(tmp_path)
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2")
    assert sl._environment(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"


def test_settings_the_supported_path_cannot_honour_are_refused():
    cfg = build_config({"simulation": {"engine": "superlink", "cpus_per_site": 0.5}})
    with pytest.raises(ConfigError, match="takes whole CPUs"):
        check_engine(cfg)
    check_engine(build_config({"simulation": {"engine": "superlink", "ray_address": "10.0.0.5:6379"}}))


def test_an_unknown_engine_is_named():
    with pytest.raises(ConfigError, match="simulation.engine"):
        build_config({"simulation": {"engine": "ray"}})


def _superlink_env(monkeypatch, tmp_path, ray_address: str) -> dict[str, str]:
    """The environment PrivateSuperLink starts its SuperLink (and so Flower's simulation
    process) with; no process is started."""
    seen = {}

    def launch(work, env):
        seen.update(env)
        return object(), 1234

    monkeypatch.setattr(sl, "_launch_superlink", launch)
    monkeypatch.setattr(sl, "_stop", lambda proc, marker: None)
    with sl.PrivateSuperLink(tmp_path, ray_address=ray_address):
        pass
    return seen


def test_a_configured_ray_cluster_reaches_flowers_ray_init(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _superlink_env(monkeypatch, tmp_path, "10.0.0.5:6379")["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert "RAY_ADDRESS" not in _superlink_env(monkeypatch, tmp_path, "")  # Flower's private Ray


def test_stopping_ends_the_group_and_every_process_of_the_run(tmp_path):
    """A shell that ignores SIGTERM, its three children, and a process of the run in a group
    of its own: all gone after _stop."""
    import os
    import subprocess

    marker = f"FLWR_HOME={tmp_path}"
    env = {**os.environ, "FLWR_HOME": str(tmp_path)}
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & trap '' TERM; sleep 60"], start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)  # its own group
    deadline = time.monotonic() + 10
    while len(sl._left_behind(proc.pid, marker)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    group = sl._left_behind(proc.pid)
    assert len(group) == 4 and proc.pid in group and other.pid not in group
    assert sorted(sl._left_behind(proc.pid, marker)) == sorted([*group, other.pid])
    sl._stop(proc, marker, term_wait=0.5)
    other.wait(timeout=5)
    assert proc.returncode is not None and not sl._left_behind(proc.pid, marker)
