"""client.supernode: Flower's SuperNode with its loop's waits capped (Flower 1.41 waits 3 s
between checks for a message, hard-coded)."""

from __future__ import annotations

import inspect
import time

import pytest
from flwr.supernode import start_client_internal

from client.supernode import CappedWaits, cap_supernode_waits, main


@pytest.fixture
def restore_flower():
    yield
    start_client_internal.time = time


def test_the_waits_patched_are_flowers_idle_and_reply_waits():
    # What is capped: Flower 1.41's idle wait between pulls and its wait for the reply.
    # A Flower that changes these lines fails here, before a deployment relies on the cap.
    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2
    assert start_client_internal.time is time


def test_cap_applies_to_every_wait_of_the_loop_only(restore_flower, monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    cap_supernode_waits(0.5)
    assert isinstance(start_client_internal.time, CappedWaits)
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.2)
    assert slept == [0.5, 0.2]
    assert start_client_internal.time.monotonic is time.monotonic  # the rest is the time module
    with pytest.raises(RuntimeError, match="supernode.pull_interval: 0"):
        cap_supernode_waits(0.5)  # already replaced: not the module this was written for


def test_main_needs_the_interval():
    with pytest.raises(SystemExit, match="--pull-interval SECONDS"):
        main(["--superlink", "x:1"])
