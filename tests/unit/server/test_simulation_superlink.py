"""``simulation.engine: superlink``'s pieces that need no SuperLink (the run itself:
tests/integration/test_simulation.py)."""

import os
from pathlib import Path

import pytest
import tomllib

import server.simulation_superlink as sl
from micromil_core.config import build_config
from micromil_core.errors import ConfigError, SiteDataError
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


def test_settings_the_supported_path_cannot_honour_are_refused():
    cfg = build_config({"simulation": {"engine": "superlink", "cpus_per_site": 0.5}})
    with pytest.raises(ConfigError, match="takes whole CPUs"):
        check_engine(cfg)
    check_engine(build_config({"simulation": {"engine": "superlink", "ray_address": "10.0.0.5:6379"}}))


class _Launched:
    """Stands in for the processes PrivateSuperLink starts: records what each was given."""

    def __init__(self, monkeypatch, fail_superlink: bool = False):
        self.superlink_env: dict[str, str] | None = None
        self.heads: list = []
        self.stopped: list = []
        launched = self

        class Head:
            def __init__(self, work, env):
                self.address, self.proc = "127.0.0.1:45678", object()
                launched.heads.append(self)

            def stop(self):
                launched.stopped.append(self.proc)

        def launch(work, env):
            if fail_superlink:
                raise OSError("no flower-superlink")
            launched.superlink_env = dict(env)
            return object(), 1234

        monkeypatch.setattr(sl, "_RayHead", Head)
        monkeypatch.setattr(sl, "_launch_superlink", launch)
        monkeypatch.setattr(sl, "_stop", self.stopped.append)


def test_flower_joins_a_private_ray_head_started_beside_the_superlink(monkeypatch, tmp_path):
    launched = _Launched(monkeypatch)
    with sl.PrivateSuperLink(tmp_path) as link:
        assert link.ray_head is launched.heads[0]
        assert launched.superlink_env["RAY_ADDRESS"] == "127.0.0.1:45678"
    assert len(launched.stopped) == 2  # the SuperLink's session, then the Ray head's


def test_a_configured_ray_cluster_is_joined_and_no_head_is_started(monkeypatch, tmp_path):
    launched = _Launched(monkeypatch)
    with sl.PrivateSuperLink(tmp_path, ray_address="10.0.0.5:6379") as link:
        assert link.ray_head is None and not launched.heads
        assert launched.superlink_env["RAY_ADDRESS"] == "10.0.0.5:6379"


def test_the_ray_head_is_stopped_when_the_superlink_cannot_start(monkeypatch, tmp_path):
    launched = _Launched(monkeypatch, fail_superlink=True)
    with pytest.raises(OSError, match="no flower-superlink"):
        with sl.PrivateSuperLink(tmp_path):
            pass
    assert launched.stopped == [launched.heads[0].proc]


@pytest.mark.parametrize("script, error", [
    ("echo 'Ray runtime started.'; sleep 30", None),
    ("echo 'cannot bind the GCS port' >&2; exit 3", "exited with code 3; see .*ray.out"),
])
def test_waiting_for_the_ray_head_reads_what_ray_start_says(monkeypatch, tmp_path, script, error):
    fake = tmp_path / "ray"
    fake.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\n{script}\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sl, "_bin", lambda name: str(fake))
    head = sl._RayHead(tmp_path, dict(os.environ))
    try:
        if error is None:
            head.wait_ready()
            args = (tmp_path / "args").read_text().split()
            assert args[args.index("--port") + 1] == head.address.split(":")[1]
            # Its own temp folder: no /tmp/ray/ray_current_cluster for other ray.init() calls.
            assert args[args.index("--temp-dir") + 1] == str(head.temp) and head.temp.is_dir()
        else:
            with pytest.raises(SiteDataError, match=error):
                head.wait_ready()
    finally:
        head.stop()
    assert head.proc.returncode is not None and not head.temp.exists()


def test_an_unknown_engine_is_named():
    with pytest.raises(ConfigError, match="simulation.engine"):
        build_config({"simulation": {"engine": "ray"}})
