"""Rebalancing and live resize in the engine service's hosting: a real `pollinate-engine run` (what the app's
Share my GPU drives) in a swarm of this module's bootstrap peer, with in-process block servers beside it.

The engine checks every PERIOD seconds (jittered). A paused host stays where it is while a gap opens; once
resumed it moves into the gap on the same peer id, and the status said so while it moved. Changing the
memory share through the API shrinks and grows the span of an "auto" hosting without a restart. Every wait
is on observable state with a deadline; the deadlines are the stated bounds.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from engine.swarm.discovery import fetch_snapshot
from tests.helpers.engine_run import engine_process, engine_status, wait_for_status
from tests.helpers.servers import running_server, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PERIOD = 1.5  # --rebalance-period of the engine under test
MOVE_SECONDS = 60.0  # stated bound: from the resume (or the share change) to serving the new span


@pytest.fixture(scope="module")
def model(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", num_layers=8, seed=5)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, bootstrap):
    data_dir = tmp_path_factory.mktemp("moving-engine")
    args = ("--demo-model", "tiny", "--swarm", "private", "--initial-peers", *bootstrap)
    with engine_process(data_dir, *args, "--rebalance-period", str(PERIOD), "--move-grace", "1") as parts:
        _process, state, client = parts
        client.state = state
        yield client


def _stop_hosting(engine) -> None:
    deadline = time.monotonic() + 120
    while (state := engine_status(engine)["state"]) not in ("idle", "error"):
        if state in ("serving", "paused"):
            engine.post("/api/hosting/stop", json={"grace_seconds": 0})
        assert time.monotonic() < deadline, f"hosting did not stop: {state}"
        time.sleep(0.2)


class StatusEvents:
    """The `status` events of /api/events, collected in a thread until closed."""

    def __init__(self, engine):
        self.seen: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, args=(engine,), daemon=True)
        self._thread.start()
        assert wait_for(lambda: self.seen, timeout=10, interval=0.05)  # the current status comes first

    def _listen(self, engine) -> None:
        with engine.stream("GET", "/api/events", timeout=120) as response:
            kind = None
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "status":
                    self.seen.append(json.loads(line[6:]))

    def moves(self) -> list[dict]:
        return [event["move"] for event in self.seen if event.get("move")]

    def close(self) -> None:
        self._stop.set()  # the stream ends at its next event or keep-alive


def _spans(client_dht, prefix: str) -> dict[str, tuple[int, int]]:
    """Online servers of `prefix` by peer id, as the swarm announces them."""
    snapshot = fetch_snapshot(client_dht, prefix, 8)
    return {peer: (span.start, span.end) for peer, span in snapshot.spans_by_peer().items()}


def _start(engine, body: dict) -> dict:
    response = engine.post("/api/hosting/start", json=body)
    assert response.status_code == 202, response.text
    return wait_for_status(engine, lambda s: s["state"] == "serving", 120)


def test_a_paused_host_stays_put_then_moves_into_the_gap_a_leaving_server_left(
    engine, bootstrap, client_dht, model
):
    prefix = engine.get("/api/hosting/plan", params={"model": str(model)}).json()["dht_prefix"]
    with (
        running_server(model, bootstrap, start_block=0, end_block=4, dht_prefix=prefix) as first,
        running_server(model, bootstrap, start_block=4, end_block=8, dht_prefix=prefix) as second,
    ):
        others = {first.info().peer_id: first, second.info().peer_id: second}
        # Four blocks, placed (and moved) by the engine where the swarm needs them.
        status = _start(engine, {"model": str(model), "blocks": "4"})
        span = tuple(status["blocks"])

        def ours() -> str | None:
            return next((peer for peer in _spans(client_dht, prefix) if peer not in others), None)

        assert wait_for(lambda: ours() and _spans(client_dht, prefix)[ours()] == span, timeout=30)
        peer_id = ours()
        # The server that does not overlap ours leaves: its blocks have no server then.
        leaving = second if span[1] <= 4 else first
        gap = (leaving.info().start_block, leaving.info().end_block)
        try:
            paused = engine.post("/api/hosting/pause", json={"release": False, "grace_seconds": 0})
            assert paused.status_code == 202, paused.text
            wait_for_status(engine, lambda s: s["state"] == "paused", 30)
            leaving.stop()
            assert wait_for(lambda: leaving.info().peer_id not in _spans(client_dht, prefix), timeout=30)

            time.sleep(4 * PERIOD)  # several rounds of the rebalancer: a paused host is never moved
            status = engine_status(engine)
            assert status["state"] == "paused" and tuple(status["blocks"]) == span and status["move"] is None
            assert engine.get("/api/stats").json()["moves"] == 0

            events = StatusEvents(engine)
            resumed_at = time.monotonic()
            assert engine.post("/api/hosting/resume").status_code == 202
            status = wait_for_status(
                engine,
                lambda s: s["state"] == "serving" and tuple(s["blocks"]) == gap and s["move"] is None,
                MOVE_SECONDS,
            )
            moved_in = time.monotonic() - resumed_at
            events.close()
            # The status said where it was going, typed: the dashboard shows it without reading prose.
            move = next(m for m in events.moves() if m["to_blocks"] == list(gap))
            assert move["reason"] == "rebalance" and move["from_blocks"] == list(span)
            assert move["message"] == f"Moving to blocks {gap[0]}:{gap[1]} (the swarm needs them more)"
            assert any(e["state"] == "draining" and e.get("move") for e in events.seen)
            assert any(e["state"] == "loading" and e.get("move") for e in events.seen)
            # Same peer, new span, announced; the old span is no longer ours.
            assert wait_for(lambda: _spans(client_dht, prefix).get(peer_id) == gap, timeout=30)
            assert engine.get("/api/stats").json()["moves"] == 1
            print(f"moved into the gap {moved_in:.1f} s after the resume (bound {MOVE_SECONDS:g} s)")
        finally:
            _stop_hosting(engine)


def test_changing_the_memory_share_resizes_the_span_on_the_same_peer_without_a_restart(
    engine, client_dht, model
):
    plan = engine.get("/api/hosting/plan", params={"model": str(model)}).json()
    prefix, total = plan["dht_prefix"], plan["total_blocks"]
    # A share for about 3 of the 8 blocks on this machine now (the plan answers for any share).
    share = 1e-9
    while True:
        answer = engine.get("/api/hosting/plan", params={"model": str(model), "memory_fraction": share})
        if answer.status_code == 200 and answer.json()["num_blocks"] >= 3:
            break
        share *= 1.5
        assert share < 1.0, answer.text
    status = _start(engine, {"model": str(model), "blocks": "auto"})
    assert status["blocks"] == [0, total]
    pid = engine.get("/api/health").json()["pid"]
    assert wait_for(lambda: list(_spans(client_dht, prefix).values()) == [(0, total)], timeout=30)
    (peer_id,) = _spans(client_dht, prefix)
    try:
        events = StatusEvents(engine)
        response = engine.post("/api/hosting/resize", json={"memory_fraction": share})
        assert response.status_code == 202, response.text
        status = wait_for_status(
            engine,
            lambda s: s["state"] == "serving" and not s["move"] and s["blocks"][1] - s["blocks"][0] < total,
            MOVE_SECONDS,
        )
        events.close()
        assert any(m["reason"] == "share" for m in events.moves())
        small = tuple(status["blocks"])
        assert 1 <= small[1] - small[0] < total
        assert wait_for(lambda: _spans(client_dht, prefix).get(peer_id) == small, timeout=30)

        response = engine.post("/api/hosting/resize", json={"memory_fraction": 1.0})
        assert response.status_code == 202, response.text
        wait_for_status(engine, lambda s: s["state"] == "serving" and s["blocks"] == [0, total], MOVE_SECONDS)
        assert wait_for(lambda: _spans(client_dht, prefix).get(peer_id) == (0, total), timeout=30)
        assert engine.get("/api/health").json()["pid"] == pid  # no restart: the same engine, the same peer

        too_small = engine.post("/api/hosting/resize", json={"memory_fraction": 1e-12})
        assert too_small.status_code == 400 and "too small" in too_small.text
        assert engine_status(engine)["blocks"] == [0, total]  # the share in force stays the one that fits

        # Stopping while a move runs (or is about to) ends everything: no span is left announced.
        assert engine.post("/api/hosting/resize", json={"memory_fraction": share}).status_code == 202
        assert engine.post("/api/hosting/stop", json={"grace_seconds": 0}).status_code == 202
        wait_for_status(engine, lambda s: s["state"] == "idle" and s["move"] is None, MOVE_SECONDS)
        assert wait_for(lambda: peer_id not in _spans(client_dht, prefix), timeout=30)
    finally:
        _stop_hosting(engine)
    idle = engine.post("/api/hosting/resize", json={"memory_fraction": 0.5})
    assert idle.status_code == 409 and "applies when sharing starts" in idle.text
