"""The relaunch wedge, made deterministic: the engine's DHT peer stops answering (SIGSTOP), the API must not.

What a user saw (issue 11): /api/status answered "idle, ready" while swarm, plan, model and hosting requests
hung; the dashboard showed "Not sharing" beside "Loading blocks… 0%" (the start request hung before hosting
left idle). Every one of those requests read the DHT inline, without a time bound, on the API's shared thread
pool: a DHT peer that answers late (busy, CPU-starved, a long traversal) hung all of them, and the app's
repeated polls filled the pool until even requests that never touch the DHT queued. A real engine (API and
service in this process, a local swarm with the tiny demo model) whose DHT process is stopped must keep
answering everything within a bound, and must recover as soon as the DHT answers again.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from engine.api.app import create_app
from engine.api.server import ApiServer
from engine.service import EngineService, ServiceConfig
from engine.service.config import SWARM_SNAPSHOT_TTL

pytestmark = pytest.mark.slow  # a real engine: DHT peer processes and a demo server

TOKEN = "stall-test-token"
WAIT = 1.0  # how long a request waits for a swarm read in this test (the engine's default is longer)
PROMPT = 2.0  # what "still answers" means for requests that never touch the DHT
PILE = 45  # more swarm-bound requests than the API's shared pool has threads (40)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    service = EngineService(
        ServiceConfig(data_dir=tmp_path_factory.mktemp("stall"), swarm="local", demo_model="tiny")
    )
    service.catalog.reads.wait = WAIT
    server = ApiServer(create_app(service, TOKEN)).start()
    client = httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30.0
    )
    try:
        service.start()
        deadline = time.monotonic() + 90
        while not client.get("/api/status").json()["ready"]:
            assert time.monotonic() < deadline, "the engine did not become ready"
            time.sleep(0.2)
        yield service, client
    finally:
        client.close()
        server.stop()
        service.close(timeout=10)


@contextmanager
def stalled(process_id: int):
    """The DHT peer process is stopped (alive, holding its connections, answering nothing) until the end."""
    os.kill(process_id, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process_id, signal.SIGCONT)


def timed(client: httpx.Client, method: str, path: str, **kwargs) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = client.request(method, path, **kwargs)
    return response, time.monotonic() - start


def assert_prompt_or_swarm_timeout(response: httpx.Response, seconds: float, bound: float) -> None:
    assert seconds < bound, f"{response.request.url.path} took {seconds:.1f} s"
    if response.status_code != 200:
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "swarm_timeout"
        assert "did not answer" in error["message"] and "try again" in error["message"].lower()


def test_a_stalled_dht_never_wedges_the_api(engine):
    service, client = engine
    for path in ("/api/swarm", "/api/hosting/plan", "/v1/models"):  # the views the app reads at start
        assert client.get(path).status_code == 200
    model = client.get("/v1/models").json()["data"][0]["id"]
    reads = service.catalog.reads

    with stalled(service.core.dht.pid):
        time.sleep(SWARM_SNAPSHOT_TTL + 0.2)  # what was read before is no longer fresh: it is read again
        # A read that is late is answered with what the swarm said a moment ago...
        response, seconds = timed(client, "GET", "/api/swarm")
        assert response.status_code == 200 and seconds < WAIT + PROMPT
        # ...and once that is too old, with an error a person can act on, within the bound.
        reads.stale_after = 0.0
        response, seconds = timed(client, "GET", "/api/swarm")
        assert response.status_code == 503 and seconds < WAIT + PROMPT
        assert_prompt_or_swarm_timeout(response, seconds, WAIT + PROMPT)

        # A chat needs the swarm too: it says so within the bound instead of "writing…" for minutes.
        chat = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        response, seconds = timed(client, "POST", "/v1/chat/completions", json=chat)
        assert response.status_code == 503
        assert_prompt_or_swarm_timeout(response, seconds, WAIT + PROMPT)

        # The app keeps polling: far more swarm-bound requests than the shared pool has threads.
        started = reads.reads_started
        paths = ["/api/swarm", "/api/hosting/plan", "/v1/models"] * (PILE // 3)
        with ThreadPoolExecutor(len(paths)) as pool:
            pile = [pool.submit(timed, client, "GET", path) for path in paths]
            time.sleep(0.5)
            # Meanwhile everything that does not need the swarm answers at once (each on its own bound).
            for method, path in (
                ("GET", "/api/status"),
                ("GET", "/api/stats"),
                ("GET", "/api/hardware"),
                ("GET", "/api/policy"),
                ("GET", "/api/health"),
            ):
                response, seconds = timed(client, method, path)
                assert response.status_code == 200, (path, response.text)
                assert seconds < PROMPT, f"{path} took {seconds:.1f} s while the swarm was stalled"
            # Starting to share answers within the bound too (it needs the swarm for its plan), and says
            # why it cannot start; hosting stays idle instead of "loading" that never began.
            response, seconds = timed(client, "POST", "/api/hosting/start", json={})
            assert_prompt_or_swarm_timeout(response, seconds, 2 * WAIT + PROMPT)
            if response.status_code == 503:
                assert client.get("/api/status").json()["state"] == "idle"
            for future in pile:
                assert_prompt_or_swarm_timeout(*future.result(timeout=60), bound=PILE * WAIT)
        # The piled-up requests shared their reads: one per thing read at a time, not one per request.
        assert reads.reads_started - started <= 6, reads.reads_started - started

    # As soon as the DHT answers again, so does the API.
    reads.stale_after = 60.0
    deadline = time.monotonic() + 40
    while True:
        response, seconds = timed(client, "GET", "/api/swarm")
        if response.status_code == 200:
            break
        assert_prompt_or_swarm_timeout(response, seconds, WAIT + PROMPT)
        assert time.monotonic() < deadline, "the API did not recover after the DHT answered again"
        time.sleep(0.5)
    assert response.json()["total_blocks"] > 0
    if client.get("/api/status").json()["state"] != "idle":  # the start above may have gone through
        client.post("/api/hosting/stop", json={"grace_seconds": 0})


def test_a_dht_read_gives_up_at_its_bound(engine):
    """What every swarm read of the engine and its swarm clients rests on: a stalled DHT peer fails a read
    after its timeout instead of holding the caller forever."""
    from engine.swarm.discovery import fetch_snapshot, list_models

    service, _client = engine
    dht = service.core.dht
    with stalled(dht.pid):
        for read in (
            lambda: fetch_snapshot(dht, "pollinate-demo-x-hf", 4, 0.5),
            lambda: list_models(dht, 0.5),
        ):
            start = time.monotonic()
            with pytest.raises(TimeoutError, match=r"did not answer within 0\.5 s"):
                read()
            assert time.monotonic() - start < 0.5 + PROMPT
