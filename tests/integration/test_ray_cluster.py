"""`micromil simulate` on an existing Ray cluster (simulation.ray_address): here a Ray head
started on 127.0.0.1, as a consortium's research team would start one on its head node."""

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from micromil_core.config import load_config
from server.simulation import simulate

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    # A short folder: Ray's socket paths inside it must fit a Unix socket name (107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = _free_port()
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                    "--temp-dir", str(temp)], check=True, capture_output=True, timeout=180)
    yield f"127.0.0.1:{port}", temp
    subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("engine", ["superlink", "in-process"])
def test_simulation_runs_on_an_existing_ray_cluster(ray_head, demo_ucsb, tmp_path, engine):
    address, ray_temp = ray_head
    cfg = load_config(None, [f"simulation.data_root={demo_ucsb}", f"simulation.ray_address={address}",
                             f"simulation.engine={engine}",
                             "model.name=gated-abmil", "federation.rounds=2", "train.num_threads=1"])
    metrics = simulate(cfg, tmp_path / "run")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2] and metrics["round"] == 2
    # The run joined the cluster instead of starting a private Ray: its driver and the
    # simulated sites' workers logged into the head's session.
    logs = [p.name for p in (ray_temp / "session_latest" / "logs").iterdir()]
    assert any(n.startswith("python-core-driver-") for n in logs), logs
    assert sum(n.startswith("python-core-worker-") for n in logs) >= 1, logs
