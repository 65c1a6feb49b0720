"""A hospital's long-lived ClientApp process: ``flower-client run`` starts it beside the
SuperNode (``supernode.isolation: process``, the default).

Flower's default isolation starts a fresh ``flwr-clientapp`` process for every message; each
spends most of its life importing torch, PyG and Flower and reloading the site's bags. Here
the SuperNode runs with ``--isolation process`` and this one process takes the SuperNode's
tasks from its Runtime API, one at a time, with Flower's own task protocol (pull the task's
input, run the ClientApp, push the reply and the task's status). Imports, the site's loaded
bags and a GPU context stay warm across rounds.

It runs the ClientApp installed at this hospital (``client.app``), the same handlers as the
per-message process: the privacy ledger, the reply checks and the error redaction are
unchanged. A run whose app (FAB) carries other client code than is installed here is
refused, naming the files that differ, rather than trained with code nobody sent.

    python -m client.worker --runtime-api-address 127.0.0.1:9094 \
        [--superexec-auth-secret-file SECRET] [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

import client as client_package
from client.app import app
from client.flower_waits import retry_objects_sooner
from micromil_core.federated.site_task import forget_runtimes

log = logging.getLogger("micromil.worker")

# Client-side code a run's FAB must carry exactly as installed here.
CLIENT_PACKAGES = ("client", "micromil_core")
IDLE_POLL_S = 0.2  # between task polls (Flower's SuperExec: 1 s); each is a local HTTP call
IDLE_AFTER_S = 120.0  # no task for this long: poll every IDLE_SLOW_POLL_S instead
IDLE_SLOW_POLL_S = 1.0
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the call SuperExec auth signs


def installed_code(root: Path | None = None) -> dict[str, str]:
    """SHA-256 of each .py file of the client-side packages installed here, by the path a
    FAB gives it (``client/app.py``)."""
    root = root or Path(client_package.__file__).resolve().parent.parent
    digests = {}
    for package in CLIENT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digests[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def fab_code(fab_content: bytes) -> dict[str, str]:
    """SHA-256 of each client-side .py file in a FAB (a zip of the coordinator's project)."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
        return {
            name: hashlib.sha256(fab.read(name)).hexdigest()
            for name in fab.namelist()
            if name.endswith(".py") and name.split("/", 1)[0] in CLIENT_PACKAGES
        }


def code_differences(sent: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Files whose content differs, or that only one side has (sorted)."""
    return sorted(name for name in set(sent) | set(installed) if sent.get(name) != installed.get(name))


class CodeMismatch(RuntimeError):
    """The run's app is not the client code installed at this site."""


class FabCheck:
    """Whether a run's FAB carries the installed client code; one verdict per FAB hash."""

    def __init__(self, installed: dict[str, str] | None = None) -> None:
        self._installed = installed
        self._verdicts: dict[str, str | None] = {}

    def __call__(self, fab_hash: str, fab_content: bytes) -> None:
        if fab_hash not in self._verdicts:
            if self._installed is None:
                self._installed = installed_code()
            differ = code_differences(fab_code(fab_content), self._installed)
            self._verdicts[fab_hash] = None if not differ else (
                f"the run's app carries other client code than this site runs "
                f"({len(differ)} file(s) differ, e.g. {', '.join(differ[:3])}): install the "
                f"coordinator's micromil-fl release at this site, or start the SuperNode with "
                f"supernode.isolation: subprocess to run the app's own code"
            )
        if (reason := self._verdicts[fab_hash]) is not None:
            raise CodeMismatch(reason)


def run_task(runtime_api_address: str, token: str, check_fab: FabCheck,
             on_new_run: Callable[[int], None]) -> None:
    """One task, as ``flwr-clientapp --token`` would run it, in this process: pull the
    message and context, run the installed ClientApp, push the reply and the status."""
    retry = make_simple_http_retry_invoker()
    runtime = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    times = [time.perf_counter()]
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(runtime)
        on_new_run(run.run_id)
        check_fab(fab.hash_str, fab.content)
        times.append(time.perf_counter())
        reply = app(message=message, context=context)
        times.append(time.perf_counter())
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the reply carries the (already redacted) reason
        log.error("ClientApp task failed: %s", exc, exc_info=not isinstance(exc, CodeMismatch))
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(runtime, reply, context)
                if status == SubStatus.COMPLETED:
                    log.info("%s message of run %s handled in %.2f s (fetched in %.2f s, reply "
                             "handed over in %.2f s)", message.metadata.message_type, run.run_id,
                             times[2] - times[1], times[1] - times[0], time.perf_counter() - times[2])
        finally:
            retry.max_tries = 1  # as flwr-clientapp: do not block on a gone SuperNode
            push_task_output(runtime, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            runtime.close()


class Worker:
    """Poll the SuperNode's Runtime API for ClientApp tasks and run them in this process."""

    def __init__(self, runtime_api_address: str, auth_secret: bytes | None = None) -> None:
        self.address = runtime_api_address
        self.auth_secret = auth_secret
        self.check_fab = FabCheck()
        self._run_id: int | None = None

    def _acquirer(self):
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.auth_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=self.auth_secret, protected_methods={ACQUIRE_TASK}))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker(),
        )

    def _on_new_run(self, run_id: int) -> None:
        """A new run reads the site's data afresh (it may have changed between runs)."""
        if run_id != self._run_id:
            forget_runtimes()
            self._run_id = run_id

    def serve(self, stop: Callable[[], bool] = lambda: False) -> None:
        # A task is handed out before the SuperNode has all of its message: fetch it as
        # soon as it is there, not up to seconds later.
        retry_objects_sooner(run_clientapp, "pull_and_inflate_object_from_tree")
        acquirer = self._acquirer()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        last_task = time.monotonic()
        try:
            while not stop():
                got = acquirer.AcquireTask(request)
                if got.HasField("task") and got.token:
                    run_task(self.address, got.token, self.check_fab, self._on_new_run)
                    last_task = time.monotonic()
                else:  # between runs (minutes to weeks) a slower poll is enough
                    idle = time.monotonic() - last_task > IDLE_AFTER_S
                    time.sleep(IDLE_POLL_S if not idle else IDLE_SLOW_POLL_S)
        finally:
            acquirer.close()


def warm_up() -> None:
    """Import now what the first message would otherwise pay for. What a run's model imports
    lazily (MicroMIL's PyG layer, on its "pyg" GAT backend) is imported when the run
    describes the site (``load_model_code`` in client.site_app), the one place that knows
    the model. The handlers themselves (``client.site_app``) are built here too."""
    started = time.perf_counter()
    import sklearn.metrics  # noqa: F401 (micromil_core.training.metrics's, on the first evaluation: ~0.6 s)
    import torch._dynamo  # noqa: F401 (torch.optim imports it on the first optimizer: ~1.3 s)

    import micromil_core.models  # noqa: F401
    import micromil_core.training.metrics  # noqa: F401

    app.site_app  # noqa: B018 (builds the handlers: imports the site code)

    log.info("ClientApp worker ready (model imports %.1f s)", time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    ap.add_argument("--superexec-auth-secret-file", help="the secret the SuperNode was started with")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per local Runtime API call
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    secret = Path(args.superexec_auth_secret_file).read_bytes() if args.superexec_auth_secret_file else None
    warm_up()
    Worker(args.runtime_api_address, secret).serve()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
