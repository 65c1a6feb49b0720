"""server.discovery.discover_sites: the coordinator asks again until the expected sites have
described themselves, or stops with one error that says who answered and what to do."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from micromil_core.config import ExperimentConfig
from micromil_core.errors import SiteDataError
from micromil_core.federated import wire
from micromil_core.federated.messages import RoundSettings
from micromil_core.federated.setup import check_identities, validate_sites
from server import discovery
from server.discovery import discover_sites

pytestmark = pytest.mark.usefixtures("in_a_task")

DIM = 4
PREFLIGHT = "RuntimeError: SiteDataError: patients.csv is empty"  # a site's redacted reason


@pytest.fixture(autouse=True)
def short_attempts(monkeypatch):
    """Attempts of 50 ms and list refreshes every 10 ms: every test runs well under 2 s."""
    monkeypatch.setattr(discovery, "DESCRIBE_ATTEMPT_S", 0.05)
    monkeypatch.setattr(discovery, "WAIT_POLL_SECONDS", 0.01)


def _description(name: str, query: Message) -> Message:
    """A site's answer as ``client.site_app``'s ``describe`` builds it: the site record, the
    aggregate counts and, for a training site, its summed feature moments."""
    content = RecordDict({wire.SITE: ConfigRecord({
        wire.SITE_NAME: name, wire.SITE_ROLE: "train", wire.SITE_CLASSES: ["benign", "malignant"],
        wire.SITE_PROBLEMS: [], wire.SITE_PRIVACY: "none",
    })})
    feats = np.arange(3 * DIM, dtype=np.float64).reshape(3, DIM)
    content[wire.MOMENTS] = ArrayRecord({"sum": Array(feats.sum(0)),
                                         "sum_sq": Array((feats**2).sum(0))})
    content[wire.METRICS] = MetricRecord({
        "num_errors": 0, "num_warnings": 0, wire.NUM_EXAMPLES: 6, "class_count_0": 3,
        "class_count_1": 3, "feature_dim": DIM, "num_instances": 3,
    })
    return Message(content, reply_to=query)


class FakeGrid:
    """Flower's Grid as discovery uses it. ``listings``: what successive ``get_node_ids``
    calls return (the last one repeats); ``sites``: node id -> the site name it answers
    with (an id not there never answers); ``silent``: node id -> how many of its first
    queries it drops; ``errors``: node id -> the error code it answers with instead."""

    def __init__(self, sites, listings=None, silent=None, errors=None) -> None:
        self.sites = sites
        self.listings = listings or [sorted(sites)]
        self.silent = dict(silent or {})
        self.errors = errors or {}
        self.asked: list[list[int]] = []  # per send_and_receive: the nodes queried
        self.timeouts: list[float] = []
        self.lists = 0

    def get_node_ids(self):
        ids = self.listings[min(self.lists, len(self.listings) - 1)]
        self.lists += 1
        return list(ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.asked.append([m.metadata.dst_node_id for m in messages])
        self.timeouts.append(timeout)
        replies = []
        for m in messages:
            nid = m.metadata.dst_node_id
            m.metadata.__dict__["_message_id"] = f"q{len(self.asked)}-{nid}"  # as Flower's push
            if self.silent.get(nid, 0) > 0:
                self.silent[nid] -= 1
            elif nid in self.errors:
                code = self.errors[nid]
                if code == ErrorCode.NODE_UNAVAILABLE:  # written by the SuperLink itself
                    reply = Message(Error(code, "Error: Node Unavailable"), reply_to=m)
                    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                else:  # what client.worker sends when the handler raised
                    reply = Message(Error(code, PREFLIGHT), reply_to=m)
                replies.append(reply)
            elif nid in self.sites:
                replies.append(_description(self.sites[nid], m))
        if len(replies) < len(messages):
            time.sleep(timeout)  # as Flower: a missing reply costs the whole timeout
        return replies


def _discover(grid, expected, timeout=5.0, site_nodes=None):
    settings = RoundSettings(ExperimentConfig(), classes=[])
    return discover_sites(grid, settings, expected, timeout, site_nodes=site_nodes)


def test_happy_path_asks_each_node_once():
    grid = FakeGrid({11: "b", 12: "a", 13: "c"})
    sites = _discover(grid, expected=3)
    assert grid.asked == [[11, 12, 13]]
    assert grid.timeouts == [discovery.DESCRIBE_ATTEMPT_S]  # an attempt, not the whole timeout
    assert grid.lists == 2  # the wait, and one look after the attempt (who is still connected)
    assert [(s.name, s.node_id) for s in sites] == [("a", 12), ("b", 11), ("c", 13)]
    total, total_sq, count = sites[0].moments
    assert total.dtype == torch.float64 and total.shape == (DIM,) and count == 3
    assert sites[0].counts[wire.NUM_EXAMPLES] == 6


def test_sites_beyond_expected_in_the_same_attempt_are_kept():
    sites = _discover(FakeGrid({11: "a", 12: "b", 13: "c"}), expected=2)
    assert [s.name for s in sites] == ["a", "b", "c"]


def test_a_site_silent_at_first_is_asked_once_more_and_included():
    grid = FakeGrid({11: "a", 12: "b", 13: "c"}, silent={12: 1})
    sites = _discover(grid, expected=3)
    assert grid.asked == [[11, 12, 13], [12]]
    assert [s.name for s in sites] == ["a", "b", "c"]
    assert grid.timeouts[1] == pytest.approx(2 * grid.timeouts[0])  # attempts grow


def test_a_site_that_never_answers_fails_with_one_clear_error():
    grid = FakeGrid({11: "a", 12: "b", 13: "c"}, silent={13: 10**6})
    start = time.monotonic()
    with pytest.raises(SiteDataError) as err:
        _discover(grid, expected=3, timeout=0.3)
    assert time.monotonic() - start < 2.0
    text = str(err.value)
    assert "only 2 of the 3 expected sites described themselves" in text
    assert "(a, b)" in text and "1 connected node id(s) never answered (13)" in text
    assert "flower-client run" in text and "restart the one that is not" in text
    assert len(grid.asked) >= 2 and all(ids == [13] for ids in grid.asked[1:])


def test_a_reconnected_site_is_asked_under_its_new_node_id():
    # node 12 (site b) went away: its id is still listed at first, then 22 replaces it
    grid = FakeGrid({11: "a", 22: "b", 13: "c"}, listings=[[11, 12, 13], [11, 13, 22]])
    sites = _discover(grid, expected=3)
    assert grid.asked == [[11, 12, 13], [22]]
    assert {s.name: s.node_id for s in sites} == {"a": 11, "b": 22, "c": 13}


def test_a_node_the_superlink_reports_gone_does_not_fail_preflight():
    grid = FakeGrid({11: "a", 12: "b", 23: "c"}, listings=[[11, 12, 13], [11, 12, 23]],
                    errors={13: ErrorCode.NODE_UNAVAILABLE})
    sites = _discover(grid, expected=3)
    assert grid.asked == [[11, 12, 13], [23]]
    assert {s.name: s.node_id for s in sites} == {"a": 11, "b": 12, "c": 23}


def test_a_site_restarted_under_a_new_node_id_counts_once(caplog):
    # a answered from 11, then restarted as 21; by the time 21 answers, 11 has left the list
    grid = FakeGrid({11: "a", 12: "b", 13: "c", 21: "a"}, silent={13: 1},
                    listings=[[11, 12, 13], [11, 12, 13, 21], [12, 13, 21]])
    sites = _discover(grid, expected=3)
    assert grid.asked == [[11, 12, 13], [13, 21]]  # 11 answered: never asked again
    assert {s.name: s.node_id for s in sites} == {"a": 21, "b": 12, "c": 13}
    assert "site a answered from node 11, and now from node 21: node 11 has left" in caplog.text
    validate_sites(sites, ExperimentConfig())  # no spurious "several sites call themselves a"


def test_a_second_live_node_naming_a_site_is_left_for_the_checks():
    # 21 also calls itself a while 11 is still connected: two hospitals with one name (or
    # an impostor joining late), not a restart; neither is dropped, and the run is refused
    grid = FakeGrid({11: "a", 12: "b", 13: "c", 21: "a"}, silent={13: 1},
                    listings=[[11, 12, 13], [11, 12, 13, 21]])
    sites = _discover(grid, expected=3)
    assert sorted(s.node_id for s in sites if s.name == "a") == [11, 21]
    with pytest.raises(SiteDataError, match="several sites call themselves a"):
        validate_sites(sites, ExperimentConfig())


def test_two_live_nodes_with_one_name_are_left_for_the_checks():
    # one attempt brings a twice: no use waiting for node 14, the checks refuse the run
    grid = FakeGrid({11: "a", 12: "a", 13: "b"}, listings=[[11, 12, 13, 14]])
    start = time.monotonic()
    sites = _discover(grid, expected=4, timeout=1.0)
    assert time.monotonic() - start < 0.5
    assert grid.asked == [[11, 12, 13, 14]] and [s.name for s in sites] == ["a", "a", "b"]
    with pytest.raises(SiteDataError, match="several sites call themselves a"):
        validate_sites(sites, ExperimentConfig())


def test_with_node_authentication_a_second_node_naming_a_site_reaches_the_identity_check():
    grid = FakeGrid({11: "a", 12: "b", 13: "c", 21: "a"}, silent={13: 1},
                    listings=[[11, 12, 13], [11, 12, 13, 21]])
    bound = {11: "a", 12: "b", 13: "c", 21: "x"}
    sites = _discover(grid, expected=3, site_nodes=bound)
    assert sorted(s.node_id for s in sites if s.name == "a") == [11, 21]
    with pytest.raises(SiteDataError, match="key registered for 'x' but calls itself 'a'"):
        check_identities(sites, bound)


def test_an_error_reply_still_fails_preflight():
    grid = FakeGrid({11: "a", 12: "b"}, errors={12: ErrorCode.CLIENT_APP_RAISED_EXCEPTION})
    with pytest.raises(SiteDataError) as err:
        _discover(grid, expected=2)
    assert str(err.value) == f"sites failed their pre-flight check: node 12: {PREFLIGHT}"
    assert grid.asked == [[11, 12]]
