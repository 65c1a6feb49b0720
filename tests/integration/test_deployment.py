"""Deployment on loopback with Flower's real runtime: a SuperLink with TLS and node
authentication started by ``flower-server start``, hospitals as separate ``flower-client
run`` processes (SuperNodes), real MUSK1 data split into 3 training sites + 1 held out.

These are the README walkthrough's commands, run as a user would run them.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from micromil_core.cli import main as micromil
from micromil_core.training.checkpoint import load_checkpoint
from tests.conftest import patient_ids
from tests.heldout import assert_matches_held_out

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SITES = ("site-0", "site-1", "site-2", "site-3")  # site-3 is held out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """One coordinator folder + four hospital folders under ``root``; owns the processes."""

    def __init__(self, root: Path, data: Path, pki: Path, name: str, experiment: dict,
                 expected_sites: int = len(SITES)) -> None:
        self.root, self.data, self.pki = root / name, data, pki
        self.root.mkdir(parents=True)
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        (self.root / "experiment.yaml").write_text(yaml.safe_dump(experiment))
        self.config = self.root / "federation.yaml"
        self.config.write_text(yaml.safe_dump({
            "experiment": "experiment.yaml",
            "state_dir": "state",
            "superlink": {
                "host": "127.0.0.1", "port": self.port,
                "ca_cert": str(pki / "coordinator" / "ca.pem"),
                "cert": str(pki / "coordinator" / "server.pem"),
                "key": str(pki / "coordinator" / "server.key"),
                "registered_keys": str(pki / "coordinator" / "registered"),
            },
            "run": {"out_dir": "runs/fed", "expected_sites": expected_sites, "wait_for_sites": 240},
        }))

    @property
    def out(self) -> Path:
        return self.root / "runs" / "fed"

    def site_config(self, site: str, key: Path | None = None, ca: Path | None = None,
                    name: str | None = None, tag: str = "", **supernode) -> Path:
        """site.yaml of hospital ``site`` (its data and, unless given, its key and CA);
        ``name`` overrides the site name it claims, ``supernode`` adds settings there."""
        path = self.root / f"{site}-{tag or ('x' if key or ca else 'ok')}.yaml"
        folder = self.pki / "sites" / site
        path.write_text(yaml.safe_dump({
            "site": {"name": name or site, "data_path": str(self.data / site),
                     "role": "holdout" if site == "site-3" else "train"},
            "superlink": {"address": f"localhost:{self.port}",
                          "ca_cert": str(ca or folder / "ca.pem"),
                          "private_key": str(key or folder / f"{site}.key")},
            "supernode": {"port": _free_port(), "state_dir": str(self.root / f"state-{site}{tag}"),
                          **supernode},
        }))
        return path

    def start_server(self) -> subprocess.Popen:
        self.procs["server"] = subprocess.Popen(
            [BIN / "flower-server", "start", "--config", str(self.config)],
            stdout=open(self.root / "server.out", "w"), stderr=subprocess.STDOUT,
        )
        return self.procs["server"]

    def launch(self, sites: tuple[str, ...] = SITES, supernode: dict | None = None) -> subprocess.Popen:
        """``flower-server start``, then these hospitals once the run is submitted;
        ``supernode``: site -> extra supernode settings of its site.yaml."""
        server = self.start_server()
        self.wait_for(lambda: "submitted" in self.server_output(), 120, "the run to be submitted")
        for site in sites:
            extra = (supernode or {}).get(site)
            self.start_site(site, self.site_config(site, tag="own", **extra) if extra else None)
        return server

    def site_output(self, name: str) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_site(self, site: str, config: Path | None = None, tag: str = "") -> subprocess.Popen:
        config = config or self.site_config(site)
        proc = subprocess.Popen(
            [BIN / "flower-client", "run", "--config", str(config)],
            stdout=open(self.root / f"{site}{tag}.out", "w"), stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killing it takes its ClientApps too
        )
        self.procs[site + tag] = proc
        return proc

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5) -> None:
        """Until ``predicate()`` holds, checking every ``poll`` s; fails after ``timeout`` s
        or as soon as the coordinator's process has ended."""
        deadline = time.monotonic() + timeout
        server = self.procs.get("server")
        while not predicate():
            if time.monotonic() > deadline or (server is not None and server.poll() is not None):
                pytest.fail(f"timed out waiting for {what}; {self.diagnosis()}")
            time.sleep(poll)

    def server_output(self) -> str:
        path = self.root / "server.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnosis(self, lines: int = 40) -> str:
        """The coordinator's output and the tail of every hospital's: what a failing
        assertion prints, so that a failure on a CI machine can be read without its files."""
        parts = [f"== coordinator\n{self.server_output()}"]
        for path in sorted(self.root.glob("site-*.out")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {path.stem} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def server(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "flower-server", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120)

    def close(self) -> None:
        self.server("stop")
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _process_groups(site: subprocess.Popen) -> set[int]:
    """A hospital's process groups: flower-client's own, that of the SuperNode it runs and
    that of its ClientApp worker (client.worker)."""
    groups = {site.pid}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == site.pid:  # a child of flower-client
            groups.add(int(fields[2]))
    assert len(groups) == 3, "flower-client should have started its SuperNode and worker by now"
    return groups


# Flower 1.41's SuperNode logs these around each message it handles (supernode/
# start_client_internal.py): the first when it has pulled the message, the second just
# before it pushes the ClientApp's reply to the SuperLink.
TRAIN_RECEIVED = "Receiving: train message"
TRAIN_SENT = "Sending: train message"


def _kill_mid_training(fed: Federation, site: str) -> None:
    """SIGKILL hospital ``site`` as a power cut would, while its first training message is in
    flight: after its SuperNode pulled it, before the reply left.

    The SuperNode logs the arrival before it has fetched the message's content, and checks
    for the ClientApp's reply only every 0.5 s after that; the site is frozen (SIGSTOP) the
    moment the arrival shows in its log, and killed once its log is seen not to have sent
    the reply. The round's history then shows the reply never arrived.
    """
    fed.wait_for(lambda: TRAIN_RECEIVED in fed.site_output(site), 240,
                 f"{site} to receive its round-1 training message", poll=0.05)
    groups = _process_groups(fed.procs[site])
    for group in groups:
        os.killpg(group, signal.SIGSTOP)  # nothing of the site runs from here on
    said = fed.site_output(site)
    assert TRAIN_SENT not in said, f"{site} replied before it could be killed:\n{said}"
    for group in groups:
        os.killpg(group, signal.SIGKILL)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data = root / "data"
    assert micromil(["datasets", "prepare", "musk1", "--out", str(data), "--sites", "3",
                     "--holdout-sites", "1", "--partition", "iid", "--seed", "0"]) == 0
    pki = root / "pki"
    done = subprocess.run([BIN / "flower-server", "provision", "--out", str(pki),
                           "--server-name", "localhost", "--sites", *SITES],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return root, data, pki


def _experiment(rounds: int, **federation) -> dict:
    return {
        "model": {"name": "abmil"},
        "train": {"lr": 5e-4, "num_threads": 1, "seed": 0},
        "federation": {"rounds": rounds, "local_epochs": 1, "strategy": "fedavg", **federation},
    }


def test_tls_node_auth_federation_two_rounds_and_refusals(setup):
    root, data, pki = setup
    fed = Federation(root, data, pki, "main", _experiment(rounds=2))
    try:
        # site-2 runs Flower's own way: its SuperNode as shipped, a fresh ClientApp process
        # per message (running the app's code); the others keep one warm worker each.
        flower_default = {"isolation": "subprocess", "pull_interval": 0}
        server = fed.launch(supernode={"site-2": flower_default})
        assert server.wait(timeout=420) == 0, fed.diagnosis()

        out = fed.server_output()
        assert "finished:completed" in out
        assert "round 2/2" in out  # round progress streamed to the coordinator's console
        metrics = json.loads((fed.out / "metrics.json").read_text())
        with open(data / "site-3" / "patients.csv") as fh:
            n_holdout = sum(1 for _ in csv.DictReader(fh))
        assert metrics["n"] == n_holdout and list(metrics["per_site"]) == ["site-3"]
        assert metrics["round"] == 2
        # What the held-out hospital reported is what the saved model scores on its patients.
        assert_matches_held_out(metrics, fed.out / "model.pt", data / "site-3")
        history = json.loads((fed.out / "history.json").read_text())["rounds"]
        assert [h["round"] for h in history] == [1, 2]
        assert all(sorted(h["train"]) == ["site-0", "site-1", "site-2"] for h in history)
        assert all(h["failures"] == [] for h in history)
        ckpt = load_checkpoint(fed.out / "model.pt")
        assert ckpt.model_name == "abmil" and ckpt.provenance["trained_on"] == ["site-0", "site-1", "site-2"]
        # Each hospital in process isolation handled every message in its one warm ClientApp
        # process (client.worker): Flower started no per-message flwr-clientapp there. The
        # subprocess site took part through Flower's own per-message processes.
        for site in SITES:
            said = fed.site_output(site)
            handled = re.findall(r"micromil\.worker: (\w+) message of run \d+ handled", said)
            if site == "site-2":
                assert handled == [] and "ClientApp worker ready" not in said
                assert said.count("Start `flwr-clientapp` process") == 5  # query + 2 x (train, evaluate)
                continue
            rounds = ["train", "evaluate"] if site != "site-3" else ["evaluate"]
            assert handled == ["query", *rounds, *rounds], (site, handled)
            assert said.count("ClientApp worker ready") == 1
            assert "flwr-clientapp" not in said

        status = json.loads(fed.server("status", "--json").stdout)
        assert status["run"]["status"] == "finished:completed"
        assert status["security"] == {"tls": True, "node_auth": True}  # as the SuperLink runs
        assert sorted(s["site"] for s in status["sites"] if s["status"] == "online") == list(SITES)

        # No patient id reaches the coordinator: not in its console, logs or results.
        coordinator_text = out + "".join(
            p.read_text(errors="replace") for p in [*fed.out.glob("*.json"), fed.out / "server.log",
                                                   fed.root / "state" / "superlink.log"]
        )
        leaked = [pid for pid in patient_ids(data) if pid in coordinator_text]
        assert leaked == []

        # A hospital whose key was never registered is refused, told why, and (with one
        # retry allowed here instead of retrying forever) gives up.
        stranger = root / "stranger"
        done = subprocess.run([BIN / "flower-client", "keygen", "--name", "site-0", "--out", str(stranger)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        config = fed.site_config("site-0", key=stranger / "site-0.key", tag="stranger",
                                 retry_backoff=1, max_activation_retries=1)
        proc = fed.start_site("site-0", config, tag="-stranger")
        assert proc.wait(timeout=120) == 1
        said = fed.site_output("site-0-stranger")
        assert said.count("[code: 2004] Failed to activate SuperNode") == 2  # Flower's own line, twice
        explanation = (
            f"the coordinator refused this hospital's node: either its public key "
            f"{stranger / 'site-0.pub'} is not registered at the coordinator (ask them to put "
            "site-0.pub in superlink.registered_keys and restart), or this node restarted within "
            "~50 s of being killed"
        )
        assert f"{explanation}; retrying in 1 s (retry 1 of 1)" in said, said
        assert f"{explanation}; giving up after 1 retry (supernode.max_activation_retries)" in said
        # A hospital that does not trust the federation's CA (another CA) is refused.
        other = root / "other-pki"
        subprocess.run([BIN / "flower-server", "provision", "--out", str(other), "--server-name",
                        "localhost", "--sites", "site-1"], check=True, capture_output=True, timeout=60)
        proc = fed.start_site("site-1", fed.site_config("site-1", ca=other / "coordinator" / "ca.pem"),
                              tag="-wrong-ca")
        assert proc.wait(timeout=90) != 0
        said = fed.site_output("site-1-wrong-ca")
        assert "CERTIFICATE_VERIFY_FAILED" in said
        assert "presented a certificate that superlink.ca_cert" in said
    finally:
        fed.close()


def _history(fed: Federation) -> list[dict]:
    path = fed.out / "history.json"
    try:
        return json.loads(path.read_text())["rounds"] if path.is_file() else []
    except json.JSONDecodeError:  # caught between write and rename: read it next time
        return []


def test_site_killed_mid_round_run_continues_and_site_rejoins(setup):
    root, data, pki = setup
    # Rounds take seconds and the dead site is refused for ~50 s, so the run is planned
    # long enough for it to come back and is stopped once it has.
    fed = Federation(root, data, pki, "fault",
                     _experiment(rounds=500, min_train_sites=2, round_timeout=240))
    try:
        server = fed.launch()
        # Round 1 has reached the hospital: its machine dies (flower-client, SuperNode and
        # ClientApps) before it replies, and comes straight back. Flower 1.41's SuperLink
        # refuses the node until it has noticed the death (~50 s); flower-client says so
        # and retries after 60 s.
        _kill_mid_training(fed, "site-1")
        fed.start_site("site-1", tag="-restarted")
        fed.wait_for(lambda: any("site-1" in h["train"] for h in _history(fed)[1:]), 480,
                     "the restarted site-1 to train in a later round")
        stopped = fed.server("stop")
        assert stopped.returncode == 0, stopped.stderr
        server.wait(timeout=60)
        restarted = fed.site_output("site-1-restarted")
        assert "the coordinator refused this hospital's node" in restarted, restarted
        refused = restarted.index("the coordinator refused this hospital's node")
        assert "or this node restarted within ~50 s of being killed; retrying in 60 s" in restarted
        assert "SuperNode ID:" in restarted[refused:], restarted  # admitted on the retry

        out = fed.server_output()
        history = _history(fed)
        assert (fed.out / "federation-state.pt").is_file()  # stopped: resumable from its checkpoint
        first = history[0]
        assert sorted(first["train"]) == ["site-0", "site-2"]  # aggregated without the dead site
        assert any(f.startswith("site-1:") for f in first["failures"]), first["failures"]
        assert "site-1: training failed" in out or "site-1: no training reply" in out
        back = next(h["round"] for h in history if "site-1" in h["train"])
        assert back > 1 and all(sorted(h["train"]) == ["site-0", "site-2"] for h in history[1:back - 1])
    finally:
        fed.close()


def test_coordinator_restart_continues_from_last_checkpoint(setup):
    root, data, pki = setup
    # Personal heads (local-head) are kept at the hospitals across the coordinator's restart.
    fed = Federation(root, data, pki, "restart", _experiment(rounds=4, personalise="local-head",
                                                             personal_epochs=2))
    try:
        first = fed.launch()
        fed.wait_for(lambda: "round 2/4" in fed.server_output(), 300, "round 2 to end")
        # Maintenance: the coordinator goes down mid-run; the hospitals keep retrying.
        stopped = fed.server("stop")
        assert stopped.returncode == 0 and "SuperLink" in stopped.stdout, stopped.stderr
        first.wait(timeout=60)
        saved = json.loads((fed.out / "history.json").read_text())["rounds"]
        assert len(saved) >= 2
        (fed.root / "server-first.out").write_text(fed.server_output())

        again = fed.start_server()
        assert again.wait(timeout=600) == 0, f"{stopped.stdout}\n{fed.diagnosis()}"
        assert "continuing from the last checkpointed round" in fed.server_output()
        history = json.loads((fed.out / "history.json").read_text())["rounds"]
        assert [h["round"] for h in history] == [1, 2, 3, 4]
        assert history[: len(saved)] == saved  # checkpointed rounds are kept, not re-run
        assert f"resuming after round {len(saved)}" in (fed.out / "server.log").read_text()
        metrics = json.loads((fed.out / "metrics.json").read_text())
        assert metrics["round"] == 4
        # Each training hospital of the last round made its personal model in its own state
        # folder, from the heads it kept through the restart; only numbers came back, and
        # the coordinator's folder holds no personal model. (The restarted coordinator asks
        # again any hospital that did not describe itself, so all of them are there before
        # round 3; one that fails a round would sit it out, named in the log.)
        last = sorted(history[-1]["train"])
        assert len(last) >= 2 and sorted(metrics["personalised"]["per_site"]) == last
        for site in last:
            run = fed.root / f"state-{site}" / "personal" / metrics["personalised"]["federation_id"]
            assert (run / "model.pt").is_file() and (run / "head-round-0004.pt").is_file()
            assert (run / "head-round-0003.pt").is_file()  # kept before the restart, used after
        assert not list(fed.root.rglob("state/personal"))
    finally:
        fed.close()


def test_impostor_with_a_registered_key_and_another_name_is_refused(setup):
    """Hospital site-0's key, but site.yaml claims to be site-9: the SuperLink admits the key,
    the coordinator refuses the name before round 1, and nothing is trained."""
    root, data, pki = setup
    fed = Federation(root, data, pki, "impostor", _experiment(rounds=1), expected_sites=2)
    try:
        server = fed.launch(sites=("site-1",))
        fed.start_site("site-0", fed.site_config("site-0", name="site-9", tag="impostor"),
                       tag="-impostor")
        assert server.wait(timeout=300) != 0, fed.diagnosis()
        out = fed.server_output()
        assert "holds the key registered for 'site-0' but calls itself 'site-9'" in out, out
        assert "round 1/1" not in out
        assert not (fed.out / "model.pt").exists()
    finally:
        fed.close()
