"""What several integration modules share: the federation simulated in-process on the
demo UCSB split (run once per session), its config and a Grid that records every message."""

import pytest

from micromil_core.config import build_config


class RecordingGrid:
    """Wraps the Grid and keeps every message the apps exchange."""

    def __init__(self, grid, log):
        self._grid, self.log = grid, log

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.log.append((messages, replies))
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def _cfg(root, rounds, engine="in-process", **fed):
    return build_config({
        "model": {"name": "micromil", "params": {"n_clusters": 8}},
        "train": {"lr": 5e-4, "seed": 3, "num_threads": 1},
        "federation": {"rounds": rounds, "local_epochs": 1, **fed},
        "simulation": {"data_root": str(root), "engine": engine},
    })


@pytest.fixture(scope="session")
def full_run(demo_ucsb, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fed"
    log = []
    from server.simulation import simulate

    metrics = simulate(_cfg(demo_ucsb, 2), out, grid_tap=lambda g: RecordingGrid(g, log))
    return out, metrics, log
