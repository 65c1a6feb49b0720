"""Only the hospital's own worker can take its tasks: a process-isolated SuperNode hands a
task (and with it the global model) only to a caller that signs with the secret
``flower-client run`` shares with the worker. Another local process is refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micromil_core.deploy.flower_cli import program

pytestmark = pytest.mark.slow

ASK = """
import sys
from pathlib import Path
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from client.worker import ACQUIRE_TASK

address, secret_file = sys.argv[1], sys.argv[2]
interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
if secret_file != "-":
    interceptors.append(SuperExecAuthHttpInterceptor(
        master_secret=Path(secret_file).read_bytes(), protected_methods={ACQUIRE_TASK}))
retry = make_simple_http_retry_invoker()
retry.max_tries = 1
runtime = RuntimeHttpClient.from_server_address(server_address=address, insecure=True,
    root_certificates=None, interceptors=interceptors, retry_invoker=retry)
try:
    got = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    print("ACCEPTED", got.HasField("task"))
except BaseException as exc:  # Flower meets a 401 by interrupting its own process
    cause = exc
    while cause is not None and getattr(cause, "response", None) is None:
        cause = cause.__context__
    print("REFUSED", cause.response.status_code if cause is not None else type(exc).__name__)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(address: str, secret: Path | str) -> str:
    done = subprocess.run([sys.executable, "-c", ASK, address, str(secret)],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]


def test_only_the_holder_of_the_secret_can_take_tasks(tmp_path):
    secret, wrong = tmp_path / "worker.secret", tmp_path / "guess.secret"
    secret.write_bytes(b"s" * 32)
    wrong.write_bytes(b"g" * 32)
    port = _free_port()
    # No SuperLink is needed: the SuperNode serves its Runtime API while it tries to connect.
    node = subprocess.Popen(
        [program("flower-supernode"), "--superlink", f"127.0.0.1:{_free_port()}", "--insecure",
         "--port", str(port), "--isolation", "process", "--superexec-auth-secret-file", str(secret)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "home")},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and node.poll() is None, "the SuperNode did not start"
                time.sleep(0.3)
        address = f"127.0.0.1:{port}"
        assert _ask(address, secret) == "ACCEPTED False"  # the worker: allowed (no task yet)
        assert _ask(address, "-") == "REFUSED 401"  # no secret
        assert _ask(address, wrong) == "REFUSED 401"  # a guess
    finally:
        node.terminate()
        node.wait(timeout=30)
