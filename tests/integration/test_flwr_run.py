"""`flwr run . local`: the way Flower users start an app runs this one as a simulation of a
data root's hospitals (docs/getting-started.md, "With Flower's own CLI")."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micromil_core.training.checkpoint import load_checkpoint
from tests.conftest import superlink_pids

ROOT = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).with_name("flwr")


def _stop_local_superlink(home: Path) -> None:
    """`flwr run . local` leaves a SuperLink serving in the background; stop ours."""
    for pid in superlink_pids(home):
        os.kill(pid, signal.SIGTERM)


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    yield home
    _stop_local_superlink(home)


def test_flwr_run_local_simulates_the_data_roots_sites(demo_ucsb, tmp_path, flwr_home):
    config = tmp_path / "quick.yaml"
    config.write_text("model: {name: gated-abmil}\nfederation: {rounds: 2}\ntrain: {num_threads: 1}\n")
    out = tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{FLWR.parent}:{os.environ['PATH']}",
           # the app runs in this environment: no per-run `uv sync` of its dependencies
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    run_config = f'data-root="{demo_ucsb}" out-dir="{out}" config="{config}"'
    started = subprocess.run(
        [str(FLWR), "run", str(ROOT), "local", "--run-config", run_config,
         "--federation-config", "num-supernodes=4 client-resources-num-cpus=1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert started.returncode == 0 and "Successfully started run" in started.stdout, started.stdout + started.stderr
    deadline = time.monotonic() + 600
    while not (out / "metrics.json").is_file():  # written once, after the last round
        assert time.monotonic() < deadline, "the run did not finish within 10 minutes"
        time.sleep(2)
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert history["run"]["train_sites"] == ["site-0", "site-1", "site-2"]
    assert history["run"]["holdout_sites"] == ["site-3"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_site"]) == ["site-3"] and metrics["round"] == 2
    assert load_checkpoint(out / "model.pt").model_name == "gated-abmil"
    # Flower's own simulation process loads the ServerApp before its engine starts: the
    # engine's loops are event-driven there too (client.flower_waits.hand_over_sooner).
    assert "messages handed over when pushed" in (out / "server.log").read_text()
