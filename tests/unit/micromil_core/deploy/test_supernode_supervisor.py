"""The hospital's SuperNode supervisor without a SuperLink: fake children that print what
flower-supernode 1.41 prints (copied from runs on loopback) and exit as it does."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import ssl
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from micromil_core.deploy.pki import provision
from micromil_core.deploy.site import SuperNodeSupervisor, speaks_tls

# flower-supernode's own lines when the SuperLink refuses the node (exit code 1).
REFUSED = (
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n"
    "Failed to initialize the connection to the SuperLink.\n"
    "[code: 2004] Failed to activate SuperNode.\n"
    "The SuperNode could not establish a connection to the SuperLink.\n"
)
PLAIN = (
    "\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.\n"
    "Failed to initialize the connection to the SuperLink.\n"
    "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)\n"
)
RETRY = "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.39 seconds\n"
ADMITTED = "\x1b[92mINFO \x1b[0m:      SuperNode ID: 6690383732161276304\n"


def _child(tmp_path: Path, attempts: list[tuple[str, int]], then_wait: bool = False) -> list[str]:
    """A program that, on its k-th start, prints attempts[k][0] and exits attempts[k][1]
    (the last entry repeats). ``then_wait``: sleep until SIGTERM instead, then exit 0."""
    script = tmp_path / "fake_supernode.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        counter = Path({str(tmp_path / "starts")!r})
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        text, code = {attempts!r}[min(n, {len(attempts) - 1})]
        sys.stdout.write(text)
        sys.stdout.flush()
        if {then_wait!r} and code == 0:
            def stop(signum, frame):
                print("fake supernode got signal", signum, flush=True)
                sys.exit(0)
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            Path({str(tmp_path / "ready")!r}).write_text("")
            time.sleep(60)
            sys.exit(3)
        sys.exit(code)
    """))
    return [sys.executable, str(script)]


def _starts(tmp_path: Path) -> int:
    return int((tmp_path / "starts").read_text())


def _supervisor(cmd, tmp_path: Path, **kwargs) -> tuple[SuperNodeSupervisor, io.StringIO]:
    key = tmp_path / "keys" / "hospital-1.key"
    key.parent.mkdir(exist_ok=True)
    key.write_text("private")
    key.with_suffix(".pub").write_text("public")
    out = io.StringIO()
    options = {"site": "hospital-1", "address": "127.0.0.1:9", "private_key": key,
               "retry_backoff": 0.05, "retry_backoff_max": 0.1, "probe": lambda a: None,
               "out": out, **kwargs}
    return SuperNodeSupervisor(cmd, **options), out


def test_refusal_is_explained_then_retried_until_admitted(tmp_path, caplog):
    cmd = _child(tmp_path, [(REFUSED, 1), (REFUSED, 1), (ADMITTED, 0)])
    sup, out = _supervisor(cmd, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert sup.run() == 0
    assert _starts(tmp_path) == 3
    assert out.getvalue().count("[code: 2004] Failed to activate SuperNode.") == 2  # Flower's lines kept
    assert "SuperNode ID: 6690383732161276304" in out.getvalue()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    pub = tmp_path / "keys" / "hospital-1.pub"
    assert warnings[0] == (
        f"the coordinator refused this hospital's node: either its public key {pub} is not "
        "registered at the coordinator (ask them to put hospital-1.pub in superlink."
        "registered_keys and restart), or this node restarted within ~50 s of being killed; "
        "retrying in 0.05 s"
    )
    assert warnings[1].endswith("retrying in 0.1 s")  # doubled, then capped


def test_refusals_stop_after_max_activation_retries(tmp_path, caplog):
    sup, _ = _supervisor(_child(tmp_path, [(REFUSED, 1)]), tmp_path, max_activation_retries=2)
    with caplog.at_level(logging.WARNING):
        assert sup.run() == 1  # the SuperNode's own exit code
    assert _starts(tmp_path) == 3  # the first start and two retries
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].endswith("(retry 1 of 2)") and messages[1].endswith("(retry 2 of 2)")
    assert caplog.records[-1].levelno == logging.ERROR
    assert messages[-1].endswith("giving up after 2 retries (supernode.max_activation_retries)")


def test_back_off_doubles_from_60_s_and_is_capped():
    sup = SuperNodeSupervisor(["x"], site="h", address="c:1", retry_backoff=60, retry_backoff_max=600)
    assert [sup.retry_wait(n) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]
    assert sup.retry_wait(10_000) == 600  # retrying forever does not overflow


def test_other_exits_pass_through_with_the_child_code(tmp_path, caplog):
    sup, out = _supervisor(_child(tmp_path, [("something else went wrong\n", 7)]), tmp_path)
    assert sup.run() == 7
    assert _starts(tmp_path) == 1 and "something else went wrong" in out.getvalue()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    ok = tmp_path / "ok"
    ok.mkdir()
    sup, _ = _supervisor(_child(ok, [("bye\n", 0)]), ok)
    assert sup.run() == 0


def test_insecure_site_against_tls_coordinator_stops_with_the_reason(tmp_path, caplog):
    # Flower prints only "Connection attempt failed" and retries forever; the probe finds TLS.
    probed = []
    cmd = _child(tmp_path, [(RETRY, 0)], then_wait=True)
    sup, _ = _supervisor(cmd, tmp_path, insecure=True, private_key=None, address="coord:9092",
                         probe=lambda address: probed.append(address) or True)
    start = time.monotonic()
    assert sup.run() == 2
    assert time.monotonic() - start < 15 and probed == ["coord:9092"]
    assert caplog.records[-1].getMessage() == (
        "this site runs --insecure but the coordinator at coord:9092 speaks TLS: drop --insecure "
        "and set superlink.ca_cert to the federation's ca.pem (and superlink.private_key to this "
        "hospital's key)"
    )


def test_insecure_site_keeps_retrying_while_nothing_answers(tmp_path, caplog):
    # Coordinator down (maintenance): not a mismatch; Flower's own retries go on.
    cmd = _child(tmp_path, [(RETRY + "gave up\n", 5)])
    sup, _ = _supervisor(cmd, tmp_path, insecure=True, probe=lambda address: None)
    assert sup.run() == 5
    assert "nothing answers at 127.0.0.1:9 yet" in caplog.records[-1].getMessage()


def test_tls_site_against_insecure_coordinator_is_explained(tmp_path, caplog):
    sup, _ = _supervisor(_child(tmp_path, [(PLAIN, 1)]), tmp_path, address="coord:9092")
    assert sup.run() == 1
    assert _starts(tmp_path) == 1
    assert caplog.records[-1].getMessage().startswith(
        "this site uses TLS but the coordinator at coord:9092 does not (it was started with --insecure)"
    )


def _send_when(path: Path, signum: int) -> threading.Thread:
    def go():
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)  # as systemd or a terminal would signal flower-client

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_the_supervisor_exits_cleanly(tmp_path, signum):
    cmd = _child(tmp_path, [(ADMITTED, 0)], then_wait=True)
    sup, out = _supervisor(cmd, tmp_path)
    previous = signal.getsignal(signum)
    _send_when(tmp_path / "ready", signum)
    assert sup.run() == 0
    assert f"fake supernode got signal {int(signum)}" in out.getvalue()
    assert signal.getsignal(signum) == previous  # the supervisor's handler is removed again


def test_signal_during_back_off_ends_the_wait(tmp_path):
    cmd = _child(tmp_path, [(REFUSED, 1)])
    sup, _ = _supervisor(cmd, tmp_path, retry_backoff=60, retry_backoff_max=60)
    _send_when(tmp_path / "starts", signal.SIGTERM)
    start = time.monotonic()
    assert sup.run() == 0
    assert time.monotonic() - start < 20 and _starts(tmp_path) == 1


def test_speaks_tls_tells_tls_from_plain_from_nothing(tmp_path):
    provision(tmp_path / "pki", ["localhost"], [])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "pki/coordinator/server.pem", tmp_path / "pki/coordinator/server.key")

    def serve(tls: bool) -> str:
        server = socket.create_server(("127.0.0.1", 0))

        def accept():
            conn, _ = server.accept()
            try:
                if tls:
                    conn = ctx.wrap_socket(conn, server_side=True)
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()
                server.close()

        threading.Thread(target=accept, daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    assert speaks_tls(serve(tls=True)) is True
    assert speaks_tls(serve(tls=False)) is False
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    assert speaks_tls(closed, timeout=2) is None


def _worker(tmp_path: Path, crashes: int) -> list[str]:
    """A fake ClientApp worker: its first ``crashes`` starts exit 9 at once, the next one
    says it is ready and waits for a signal."""
    script = tmp_path / "fake_worker.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        counter = Path({str(tmp_path / "worker_starts")!r})
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        if n < {crashes}:
            print("fake worker crashed", flush=True)
            sys.exit(9)
        signal.signal(signal.SIGTERM, lambda s, f: (print("fake worker got signal", s, flush=True), sys.exit(0)))
        print("fake worker ready", flush=True)
        Path({str(tmp_path / "ready")!r}).write_text("")
        time.sleep(60)
    """))
    return [sys.executable, str(script)]


def test_worker_runs_beside_the_supernode_is_restarted_after_a_crash_and_stopped_with_it(
        tmp_path, caplog, monkeypatch):
    # The SuperNode waits; the worker crashes once, comes back, and SIGTERM stops both.
    supernode = _child(tmp_path, [(ADMITTED, 0)], then_wait=True)
    (tmp_path / "ready").parent.mkdir(exist_ok=True)
    sup, out = _supervisor(supernode, tmp_path, worker_cmd=_worker(tmp_path, crashes=1))
    monkeypatch.setattr("micromil_core.deploy.site.WORKER_RESTART_S", 0.2)
    marker = tmp_path / "ready"

    def stop_when_worker_ready():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if marker.exists() and "fake worker ready" in out.getvalue():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_worker_ready, daemon=True).start()
    with caplog.at_level(logging.ERROR):
        assert sup.run() == 0
    said = out.getvalue()
    assert int((tmp_path / "worker_starts").read_text()) == 2
    assert "fake worker crashed" in said and "fake worker ready" in said
    assert f"fake worker got signal {int(signal.SIGTERM)}" in said
    assert f"fake supernode got signal {int(signal.SIGTERM)}" in said
    assert [r.getMessage() for r in caplog.records] == [
        "the ClientApp worker ended (exit code 9); starting it again in 0.2 s (its output above says why)"
    ]


def test_worker_is_ended_when_the_supernode_exits(tmp_path):
    supernode = [sys.executable, "-c", "import time; print('bye', flush=True); time.sleep(2); raise SystemExit(4)"]
    sup, out = _supervisor(supernode, tmp_path, worker_cmd=_worker(tmp_path, crashes=0))
    start = time.monotonic()
    assert sup.run() == 4  # the SuperNode's exit code
    assert time.monotonic() - start < 20
    assert "fake worker ready" in out.getvalue()
    worker_pid_alive = [p for p in Path("/proc").glob("[0-9]*/cmdline")
                        if "fake_worker.py" in p.read_bytes().decode(errors="replace")]
    assert worker_pid_alive == []
