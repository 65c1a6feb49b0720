"""The ClientApp's error path: a failure at a site is logged there in full, and the server
gets only the error's type and a message with every patient id and the site's path removed."""

from __future__ import annotations

import logging

import pytest

from client.app import _private_errors
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
