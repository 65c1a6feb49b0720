"""A hospital's side: check the site data, then run this site's SuperNode under a small
supervisor that explains Flower's connection refusals and retries the ones worth retrying."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from micromil_core.data.site_check import SiteReport, check_site
from micromil_core.deploy.config import REFUSAL_WINDOW_S, SiteDeployConfig, require_files
from micromil_core.deploy.flower_cli import flower_env, program
from micromil_core.errors import SiteDataError
from micromil_core.privacy.node_config import to_node_config as privacy_node_config

log = logging.getLogger(__name__)

INSECURE_WARNING = (
    "WARNING: --insecure: this site will not verify the coordinator's certificate and will "
    "send model updates unencrypted. Use only on a closed test network."
)


def check_site_data(cfg: SiteDeployConfig) -> SiteReport:
    """The same checks as ``micromil check-site``; raises if the site cannot take part."""
    data = cfg.path(cfg.site.data_path)
    report = check_site(data)
    if not report.ok:
        raise SiteDataError(
            f"{cfg.source}: site data {data} has problems; fix them before joining "
            f"(details stay on this machine):\n{report.format()}"
        )
    return report


def node_config(cfg: SiteDeployConfig) -> str:
    """``--node-config`` text: TOML values, so strings are quoted (flower-supernode 1.41 --help)."""
    values = {
        "site-name": cfg.site.name,
        "data-path": str(cfg.path(cfg.site.data_path)),
        "role": cfg.site.role,
        "state-dir": str(cfg.path(cfg.supernode.state_dir)),
        **privacy_node_config(cfg.privacy),
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(cfg: SiteDeployConfig, *, insecure: bool = False,
                      secret_file: Path | None = None) -> list[str]:
    """``flower-supernode`` for this site; with ``supernode.isolation: process`` it leaves
    running the ClientApp to :func:`worker_command`, which signs its task requests with the
    secret in ``secret_file``."""
    sl = cfg.superlink
    sn = cfg.supernode
    # client.supernode: Flower's SuperNode, checking for messages every pull_interval s.
    start = ([sys.executable, "-m", "client.supernode", "--pull-interval", str(sn.pull_interval)]
             if sn.pull_interval else [program("flower-supernode")])
    cmd = [
        *start,
        "--superlink", sl.address,
        "--port", str(sn.port),
        "--node-config", node_config(cfg),
        "--isolation", sn.isolation,
    ]
    if secret_file is not None:
        cmd += ["--superexec-auth-secret-file", str(secret_file)]
    if insecure:
        return [*cmd, "--insecure"]
    files = {"superlink.ca_cert": cfg.path(sl.ca_cert)}
    if sl.private_key:
        files["superlink.private_key"] = cfg.path(sl.private_key)
    require_files(cfg.source, files)
    cmd += ["--root-certificates", str(files["superlink.ca_cert"])]
    if sl.private_key:
        cmd += ["--auth-supernode-private-key", str(files["superlink.private_key"])]
    return cmd


def supernode_env(cfg: SiteDeployConfig) -> dict[str, str]:
    home = cfg.path(cfg.supernode.state_dir) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    return flower_env(home)


def worker_command(cfg: SiteDeployConfig, secret: Path) -> list[str]:
    """The long-lived ClientApp process (``client.worker``) beside a ``process``-isolated
    SuperNode: it takes every message from the SuperNode's local Runtime API."""
    return [sys.executable, "-m", "client.worker",
            "--runtime-api-address", f"127.0.0.1:{cfg.supernode.port}",
            "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid())]


def worker_secret(cfg: SiteDeployConfig) -> Path:
    """A fresh random secret, readable by this user only, shared by the SuperNode and its
    worker: without it no other local process can take this site's tasks (and the model)."""
    path = cfg.path(cfg.supernode.state_dir) / "worker.secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    os.replace(tmp, path)
    return path


def run_supernode(cfg: SiteDeployConfig, *, insecure: bool = False) -> int:
    """Run this site's SuperNode (and, with process isolation, its ClientApp worker) until
    it ends or this process is stopped; the exit code."""
    key = cfg.path(cfg.superlink.private_key) if cfg.superlink.private_key and not insecure else None
    sn = cfg.supernode
    secret = worker_secret(cfg) if sn.isolation == "process" else None
    return SuperNodeSupervisor(
        supernode_command(cfg, insecure=insecure, secret_file=secret), supernode_env(cfg),
        worker_cmd=worker_command(cfg, secret) if secret else None,
        site=cfg.site.name, address=cfg.superlink.address, insecure=insecure,
        ca_cert=None if insecure else cfg.path(cfg.superlink.ca_cert), private_key=key,
        retry_backoff=sn.retry_backoff, retry_backoff_max=sn.retry_backoff_max,
        max_activation_retries=sn.max_activation_retries,
    ).run()


# What flower-supernode 1.41 prints when the SuperLink turns it away (the connection error of
# flwr/supernode/fleet_http_connection.py, exit code 305; error codes in flwr/supercore/error).
ACTIVATION_REFUSED = ("[code: 2004]", "Failed to activate SuperNode")  # FLEET_NODE_ACTIVATION_FAILED
REGISTRATION_REQUIRED = ("[code: 2001]", "must be registered via the CLI")  # node auth, no key given
PLAIN_COORDINATOR = ("WRONG_VERSION_NUMBER",)  # a TLS handshake answered in plain HTTP
UNTRUSTED_COORDINATOR = ("CERTIFICATE_VERIFY_FAILED",)
CONNECT_RETRY = "Connection attempt failed"  # Flower retries this forever and never says why
ACTIVATED = "SuperNode ID:"  # logged once the SuperLink has accepted the node
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

WORKER_RESTART_S = 5.0  # first wait before a crashed ClientApp worker starts again (doubling)

STOPPED = "stopped"
REFUSED = "refused"
INSECURE_VS_TLS = "insecure-vs-tls"
EXITED = "exited"


class SuperNodeSupervisor:
    """Run ``flower-supernode`` as a child and stay its parent.

    Its output is passed through line by line; SIGTERM/SIGINT are forwarded to its process
    group (its own, so that a terminal's Ctrl-C reaches it once, through us, and so that the
    SuperExec and ClientApp processes it starts are stopped with it). A refused activation is
    explained and retried with back-off; a TLS mismatch is explained and ends the run; any
    other exit is passed through with the child's exit code.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        site: str,
        address: str,
        insecure: bool = False,
        ca_cert: Path | None = None,
        private_key: Path | None = None,
        retry_backoff: float = 60.0,
        retry_backoff_max: float = 600.0,
        max_activation_retries: int = 0,
        stop_grace: float = 20.0,
        probe: Callable[[str], bool | None] | None = None,
        out: TextIO | None = None,
        worker_cmd: Sequence[str] | None = None,
    ) -> None:
        self.cmd, self.env = list(cmd), env
        self.site, self.address, self.insecure = site, address, insecure
        self.ca_cert, self.private_key = ca_cert, private_key
        self.retry_backoff, self.retry_backoff_max = retry_backoff, retry_backoff_max
        self.max_activation_retries = max_activation_retries
        self.stop_grace = stop_grace
        self.probe = probe or speaks_tls
        self.out = out
        self.probe_interval = 10.0  # s between TLS probes while Flower keeps retrying
        self._stop = threading.Event()
        self.worker_cmd = list(worker_cmd) if worker_cmd else None
        self._child: subprocess.Popen | None = None
        self._worker: subprocess.Popen | None = None
        self._open_streams = 0
        self._worker_restarts = 0

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        refusals = 0
        while True:
            outcome, code, activated = self._run_once()
            if activated:
                refusals = 0  # the back-off restarts after the node was admitted once
            if outcome == STOPPED or self._stop.is_set():
                return 0
            if outcome == INSECURE_VS_TLS:
                log.error(
                    "this site runs --insecure but the coordinator at %s speaks TLS: drop "
                    "--insecure and set superlink.ca_cert to the federation's ca.pem "
                    "(and superlink.private_key to this hospital's key)", self.address,
                )
                return 2
            if outcome != REFUSED:
                return code
            refusals += 1
            limit = self.max_activation_retries
            if limit and refusals > limit:
                log.error("%s; giving up after %d %s (supernode.max_activation_retries)",
                          self.refusal_reason(), limit, "retry" if limit == 1 else "retries")
                return code or 1
            wait = self.retry_wait(refusals)
            count = f" (retry {refusals} of {limit})" if limit else ""
            log.warning("%s; retrying in %g s%s", self.refusal_reason(), wait, count)
            if self._stop.wait(wait):
                return 0

    def retry_wait(self, refusals: int) -> float:
        """Seconds before the next start after ``refusals`` refusals in a row (doubling)."""
        doublings = min(refusals - 1, 30)  # retrying forever must not overflow the float
        return min(self.retry_backoff * 2.0 ** doublings, self.retry_backoff_max)

    def refusal_reason(self) -> str:
        if self.private_key is None:
            return (f"the coordinator refused this hospital's node: it restarted within "
                    f"~{REFUSAL_WINDOW_S:.0f} s of being killed")
        pub = self.private_key.with_suffix(".pub")
        which = str(pub) if pub.is_file() else f"(the .pub of {self.private_key})"
        return (
            f"the coordinator refused this hospital's node: either its public key {which} is "
            f"not registered at the coordinator (ask them to put {self.site}.pub in "
            f"superlink.registered_keys and restart), or this node restarted within "
            f"~{REFUSAL_WINDOW_S:.0f} s of being killed"
        )

    def _run_once(self) -> tuple[str, int, bool]:
        """One child from start to exit: (outcome, exit code, whether it was admitted)."""
        lines: queue.Queue[bytes | None] = queue.Queue()
        child = self._spawn(self.cmd, lines)
        self._child = child
        self._open_streams = 1
        worker_due = time.monotonic() if self.worker_cmd else None
        self._worker_restarts = 0
        seen = {REFUSED: False, "registration": False, "plain": False, "untrusted": False,
                "activated": False, "mismatch": False, "warned_down": False, "last_probe": -float("inf")}
        exited_at = stop_at = None
        while self._open_streams:
            try:
                raw = lines.get(timeout=0.2)
            except queue.Empty:
                raw = b""
            if raw is None:
                self._open_streams -= 1
                continue
            if raw and self._observe(raw, seen):  # an insecure site found a TLS coordinator
                self._signal_children(signal.SIGTERM)
                stop_at = time.monotonic()
            now = time.monotonic()
            if self._stop.is_set() and stop_at is None:
                stop_at = now
            if stop_at is not None and now - stop_at > self.stop_grace:
                self._signal_children(signal.SIGKILL)
            if child.poll() is not None:
                # The SuperNode is gone, but a process it (or we) started may still hold a
                # pipe open: give them a moment, then end their process groups.
                exited_at = exited_at or now
                if now - exited_at > 2.0:
                    self._signal_children(signal.SIGTERM if now - exited_at < 5.0 else signal.SIGKILL)
                if now - exited_at > 6.0:
                    break
            elif stop_at is None:
                worker_due = self._keep_worker(lines, worker_due, now)
        code = child.wait()
        self._signal_children(signal.SIGKILL)  # nothing of this attempt outlives it
        self._child = self._worker = None
        if self._stop.is_set():
            return STOPPED, code, seen["activated"]
        if seen["mismatch"]:
            return INSECURE_VS_TLS, code, seen["activated"]
        if seen[REFUSED] and code != 0:
            return REFUSED, code, seen["activated"]
        self._explain_exit(seen, code)
        return EXITED, code, seen["activated"]

    def _spawn(self, cmd: Sequence[str], lines: queue.Queue) -> subprocess.Popen:
        """Start ``cmd`` in its own process group, its output read line by line into ``lines``
        (so that a terminal's Ctrl-C reaches it once, through us)."""
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if self._stop.is_set():  # a signal that came while it was being started
            _signal_group(proc, signal.SIGTERM)
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        return proc

    def _keep_worker(self, lines: queue.Queue, due: float | None, now: float) -> float | None:
        """Start the ClientApp worker when due; when it has ended while the SuperNode runs,
        say so and plan its restart (5 s, doubling per crash up to a minute)."""
        if due is not None and now >= due:
            self._worker = self._spawn(self.worker_cmd, lines)
            self._open_streams += 1
            return None
        if due is None and self._worker is not None and self._worker.poll() is not None:
            self._worker_restarts += 1
            wait = min(WORKER_RESTART_S * 2 ** (self._worker_restarts - 1), 60.0)
            log.error("the ClientApp worker ended (exit code %s); starting it again in %g s "
                      "(its output above says why)", self._worker.returncode, wait)
            self._worker = None
            return now + wait
        return due

    def _observe(self, raw: bytes, seen: dict) -> bool:
        """Pass one line of output through and note what it says; True when an insecure
        site has just found out that the coordinator speaks TLS."""
        out = self.out or sys.stdout
        text = raw.decode(errors="replace")
        out.write(text if text.endswith("\n") else text + "\n")
        out.flush()
        plain = _ANSI.sub("", text)
        seen[REFUSED] |= any(m in plain for m in ACTIVATION_REFUSED)
        seen["registration"] |= any(m in plain for m in REGISTRATION_REQUIRED)
        seen["plain"] |= any(m in plain for m in PLAIN_COORDINATOR)
        seen["untrusted"] |= any(m in plain for m in UNTRUSTED_COORDINATOR)
        seen["activated"] |= ACTIVATED in plain
        if (CONNECT_RETRY not in plain or seen["mismatch"]
                or time.monotonic() - seen["last_probe"] <= self.probe_interval):
            return False
        # Flower says only that it will retry; find out why.
        seen["last_probe"] = time.monotonic()
        answer = self.probe(self.address) if self.insecure else _reachable(self.address)
        if answer is None and not seen["warned_down"]:
            seen["warned_down"] = True
            log.warning(
                "nothing answers at %s yet (the coordinator is down, or the address "
                "or a firewall is wrong); the SuperNode keeps retrying", self.address,
            )
        elif self.insecure and answer:
            seen["mismatch"] = True
            return True
        return False

    def _signal_children(self, signum: int) -> None:
        for proc in (self._child, self._worker):
            if proc is not None:
                _signal_group(proc, signum)

    def _explain_exit(self, seen: dict[str, bool], code: int) -> None:
        if code == 0:
            return
        if seen["registration"]:
            log.error(
                "the coordinator at %s admits only hospitals with a registered key, and this "
                "site has no superlink.private_key: set it to this hospital's key (%s.key; its "
                ".pub must be registered at the coordinator)", self.address, self.site,
            )
        elif seen["plain"]:
            log.error(
                "this site uses TLS but the coordinator at %s does not (it was started with "
                "--insecure): ask its operator to start it with TLS, or, on a closed test "
                "network only, run this site with --insecure", self.address,
            )
        elif seen["untrusted"]:
            log.error(
                "the coordinator at %s presented a certificate that superlink.ca_cert %s does "
                "not vouch for: use the ca.pem from this federation's coordinator, and check "
                "that the host in superlink.address is one of its --server-name values",
                self.address, self.ca_cert,
            )

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop.set()
        self._signal_children(signum)


def speaks_tls(address: str, timeout: float = 5.0) -> bool | None:
    """Whether the server at ``host:port`` completes a TLS handshake.

    None if nothing answers there. The certificate is not checked: the question is only
    whether the coordinator speaks TLS at all, and nothing is sent after the handshake.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None
    with sock:
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return True
        except (ssl.SSLError, OSError):
            return False


def _reachable(address: str, timeout: float = 5.0) -> bool | None:
    """True if something accepts TCP connections at ``host:port``, else None."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return None


def _read_lines(stream, lines: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw)
    lines.put(None)


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
