"""The ClientApp's error path: a failure at a site is logged there in full, and the server
gets only the error's type and a message with every patient id and the site's path removed."""

from __future__ import annotations

import logging

import pytest

from client.site_app import _private_errors
from micromil_core.federated.site_task import SiteSettings
from tests.conftest import write_site


def test_a_failing_handler_reports_no_patient_id_and_no_path(tmp_path, caplog):
    site_dir = write_site(tmp_path / "hospital-a", n_patients=6)
    site = SiteSettings("hospital-a", site_dir)
    leak = f"bad value in {site_dir}/features/p003.pt for patient p003 (see p0031: fine)"

    @_private_errors(lambda context: site)
    def train(msg, context):
        raise ValueError(leak)

    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError) as info:
        train(None, None)
    sent = str(info.value)
    assert sent.startswith("ValueError: ")
    assert "p003 " not in sent and "p003." not in sent and str(site_dir) not in sent
    assert "<patient>" in sent and "SITE" in sent
    assert "p0031" in sent  # only whole ids go: a longer id that is not a patient stays
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert leak in caplog.text  # the site's own log keeps everything


def test_an_unreadable_site_sends_no_detail_at_all(tmp_path):
    site = SiteSettings("hospital-b", tmp_path / "missing")

    @_private_errors(lambda context: site)
    def evaluate(msg, context):
        raise OSError(f"cannot read {tmp_path}/missing/patients.csv row 4: patient X17")

    with pytest.raises(RuntimeError, match=r"^OSError: see the site's log$"):
        evaluate(None, None)


def test_the_entry_point_imports_no_torch_and_builds_the_handlers_on_the_first_message():
    # Flower's simulation process and every SuperNode load client.app:app before their
    # first message; the site code (torch and up) is imported when one arrives.
    import subprocess
    import sys

    code = (
        "import sys; from client.app import app; print('torch' in sys.modules, app._site_app is None); "
        "inner = app.site_app; print('torch' in sys.modules, app.site_app is inner, "
        "sorted(inner._registered_funcs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120).stdout.splitlines()
    assert out[0] == "False True"
    assert out[1].startswith("True True") and "'query.default'" in out[1] and "'train.personalise'" in out[1]


def test_the_entry_point_hands_every_message_to_the_site_handlers(monkeypatch):
    from client.app import SiteClientApp

    seen = []

    class Handlers:
        def __call__(self, message, context):
            seen.append((message, context))
            return "reply"

    app = SiteClientApp()
    monkeypatch.setattr(app, "_site_app", Handlers())
    assert app("msg", "ctx") == "reply" and app("msg2", "ctx2") == "reply"
    assert seen == [("msg", "ctx"), ("msg2", "ctx2")]


def test_the_entry_point_pickles_without_its_handlers():
    # Flower's simulation pickles the app for each Ray actor; each builds its own handlers.
    import pickle

    from client.app import SiteClientApp

    app = SiteClientApp()
    built = app.site_app
    copy = pickle.loads(pickle.dumps(app))
    assert isinstance(copy, SiteClientApp) and copy._site_app is None and app.site_app is built
    assert sorted(copy.site_app._registered_funcs) == sorted(built._registered_funcs)


def test_a_simulated_node_reads_its_run_s_sites_once(monkeypatch):
    # Under Flower's own simulation every message names the run config; reading the
    # config and the data root for each message cost ~15 ms of a small site's ~20 ms.
    from types import SimpleNamespace

    from client import site_app

    reads = []

    def sites_of(run_config):
        reads.append(dict(run_config))
        return [SiteSettings(f"s{i}", site_app.Path(f"/d/s{i}"), "train") for i in range(2)]

    monkeypatch.setattr(site_app, "simulated_sites", sites_of)
    monkeypatch.setattr(site_app, "_SIMULATED_SITES", {})

    def context(run_id, node, root="/d"):
        return SimpleNamespace(run_id=run_id, node_config={"partition-id": node},
                               run_config={"data-root": root, "config": "c.yaml"})

    assert [site_app.site_from_context(context(1, n)).name for n in (0, 1, 0)] == ["s0", "s1", "s0"]
    assert len(reads) == 1
    site_app.site_from_context(context(2, 0))  # a new run reads again
    site_app.site_from_context(context(2, 0, root="/other"))  # so does another run config
    assert len(reads) == 3
