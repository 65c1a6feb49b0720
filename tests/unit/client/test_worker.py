"""client.worker runs the ClientApp installed at the site; a run whose app (FAB) carries
other client code is refused, naming the files, instead of being trained with it."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from client.worker import CodeMismatch, FabCheck, code_differences, fab_code, installed_code

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def _fab(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _installed_files() -> dict[str, bytes]:
    return {name: (ROOT / name).read_bytes() for name in installed_code()}


def test_installed_code_covers_the_client_side_packages():
    code = installed_code()
    assert {"client/app.py", "client/worker.py", "micromil_core/__init__.py",
            "micromil_core/federated/site_task.py"} <= set(code)
    assert not any(name.startswith(("server/", "tests/")) for name in code)


def test_fab_built_by_flower_from_this_project_passes(tmp_path):
    done = subprocess.run([BIN / "flwr", "build", "--app", str(ROOT)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    content = fab.read_bytes()
    assert code_differences(fab_code(content), installed_code()) == []
    FabCheck()("hash-1", content)  # no error


def test_other_client_code_is_refused_naming_the_files():
    files = _installed_files()
    files["micromil_core/models/abmil.py"] += b"\n# changed at the coordinator\n"
    files["client/extra.py"] = b"print('not installed here')\n"
    files["server/app.py"] = b"# server code is not the site's concern\n"
    del files["client/cli.py"]
    check = FabCheck()
    with pytest.raises(CodeMismatch) as err:
        check("hash-2", _fab(files))
    text = str(err.value)
    assert "3 file(s) differ, e.g. client/cli.py, client/extra.py, micromil_core/models/abmil.py" in text
    assert "install the coordinator's micromil-fl release" in text
    with pytest.raises(CodeMismatch):  # the verdict is kept for the FAB's hash
        check("hash-2", b"")


def test_worker_runs_each_task_it_is_given_and_polls_slower_when_idle(monkeypatch):
    import client.worker as worker

    clock = {"now": 0.0}
    slept, ran = [], []
    answers = iter([None, "token-1", None, None, None])

    class Got:
        def __init__(self, token):
            self.token = token or ""

        def HasField(self, name):  # noqa: N802  (protobuf's spelling)
            return bool(self.token)

    class Acquirer:
        def AcquireTask(self, request):  # noqa: N802
            return Got(next(answers))

        def close(self):
            pass

    def sleep(seconds):
        slept.append(seconds)
        clock["now"] += 100.0  # each idle poll stands for 100 s of nothing

    monkeypatch.setattr(worker.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(worker.time, "sleep", sleep)
    monkeypatch.setattr(worker, "run_task", lambda address, token, *rest: ran.append(token))
    w = worker.Worker("127.0.0.1:1")
    monkeypatch.setattr(w, "_acquirer", Acquirer)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 5

    w.serve(stop)
    assert ran == ["token-1"]
    # before the task, right after it and 100 s after it: quick; 200 s after it: slow
    quick, slow = worker.IDLE_POLL_S, worker.IDLE_SLOW_POLL_S
    assert slept == [quick, quick, quick, slow]


def test_warm_up_imports_what_the_first_round_would_pay_for():
    # The worker lives across rounds: the first train message should find the site's
    # handlers built and what is imported lazily (torch.optim's dynamo, the evaluation's
    # scikit-learn metrics) loaded.
    code = ("import sys; from client.worker import warm_up, app; warm_up(); "
            "print('torch._dynamo' in sys.modules, 'sklearn.metrics' in sys.modules, app._site_app is not None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]
