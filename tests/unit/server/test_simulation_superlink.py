"""``simulation.engine: superlink``'s pieces that need no SuperLink (the run itself:
tests/integration/test_simulation.py)."""

from pathlib import Path

import pytest
import tomllib

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


@pytest.mark.parametrize("simulation, message", [
    ({"ray_address": "127.0.0.1:6379"}, "ray_address needs simulation.engine: in-process"),
    ({"cpus_per_site": 0.5}, "takes whole CPUs"),
])
def test_settings_the_supported_path_cannot_honour_are_refused(simulation, message):
    cfg = build_config({"simulation": {"engine": "superlink", **simulation}})
    with pytest.raises(ConfigError, match=message):
        check_engine(cfg)


def test_an_unknown_engine_is_named():
    with pytest.raises(ConfigError, match="simulation.engine"):
        build_config({"simulation": {"engine": "ray"}})
