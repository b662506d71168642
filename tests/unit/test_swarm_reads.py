"""SwarmReads: one read per key at a time, however many requests want it, and waits that have a bound."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.api.hardware import HardwareProbe
from engine.service.errors import SwarmTimeoutError
from engine.service.swarm_reads import SwarmReads


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_that_arrive_together_share_one_read():
    reads = SwarmReads(wait=5.0, stale_after=60.0)
    calls = []

    def read():
        calls.append(1)
        time.sleep(0.3)
        return {"servers": 2}

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: reads.get("snapshot", read, max_age=1.0, what="x"), range(20)))
    assert results == [{"servers": 2}] * 20
    assert len(calls) == 1 and reads.reads_started == 1
    assert reads.get("snapshot", read, max_age=1.0, what="x") == {"servers": 2}  # fresh: not read again
    assert len(calls) == 1


def test_a_late_read_is_a_bounded_wait_and_an_actionable_error():
    reads = SwarmReads(wait=0.2, stale_after=60.0)
    release = threading.Event()

    def read():
        release.wait(10)
        return "late"

    start = time.monotonic()
    with pytest.raises(SwarmTimeoutError) as caught:
        reads.get("index", read, max_age=5.0, what="the swarm's model index")
    assert time.monotonic() - start < 1.0
    message = str(caught.value)
    assert "did not answer within 0.2 s" in message and "the swarm's model index" in message
    assert "try again" in message.lower()
    with pytest.raises(SwarmTimeoutError):  # the next request joins the read in progress, starts none
        reads.get("index", read, max_age=5.0, what="the swarm's model index")
    assert reads.reads_started == 1
    release.set()
    time.sleep(0.1)
    assert reads.get("index", read, max_age=5.0, what="the swarm's model index") == "late"
    assert reads.reads_started == 1


def test_a_late_read_gives_the_last_value_while_it_is_recent():
    clock = Clock()
    reads = SwarmReads(wait=0.1, stale_after=30.0, clock=clock)
    assert reads.get("k", lambda: "first", max_age=1.0, what="k") == "first"
    release = threading.Event()

    def slow():
        release.wait(10)
        return "second"

    clock.now += 10  # older than max_age, younger than stale_after
    assert reads.get("k", slow, max_age=1.0, what="k") == "first"
    clock.now += 30  # now too old to show
    with pytest.raises(SwarmTimeoutError):
        reads.get("k", slow, max_age=1.0, what="k")
    release.set()
    time.sleep(0.1)
    assert reads.get("k", slow, max_age=1.0, what="k") == "second"


def test_a_failed_read_raises_and_the_next_request_reads_again():
    reads = SwarmReads(wait=1.0, stale_after=60.0)

    def broken():
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        reads.get("k", broken, max_age=1.0, what="k")

    def dht_timeout():
        raise TimeoutError("the DHT peer did not answer within 30 s")

    with pytest.raises(SwarmTimeoutError, match="did not answer within 30 s"):
        reads.get("k", dht_timeout, max_age=1.0, what="k")
    assert reads.get("k", lambda: "ok", max_age=1.0, what="k") == "ok"
    assert reads.reads_started == 3


def test_several_keys_are_read_in_parallel_under_one_deadline():
    reads = SwarmReads(wait=2.0, stale_after=60.0)

    def slow(value):
        def read():
            time.sleep(0.4)
            return value

        return read

    def broken():
        raise ValueError("unreadable")

    start = time.monotonic()
    found = reads.get_many({"a": slow(1), "b": slow(2), "c": broken}, max_age=1.0, what="x", errors=True)
    assert time.monotonic() - start < 0.8  # in parallel, not 0.4 s each
    assert found["a"] == 1 and found["b"] == 2 and isinstance(found["c"], ValueError)


def test_hardware_is_probed_once_for_requests_that_come_close_together(tmp_path):
    probe = HardwareProbe(tmp_path, max_age=60.0)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: probe.read(), range(8)))
    assert probe.probes == 1 and all(r is results[0] for r in results)
    assert results[0]["disk"]["path"] == str(tmp_path) and results[0]["cpu"]["cores"] >= 1
