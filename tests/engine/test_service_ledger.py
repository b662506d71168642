"""The contribution ledger inside the engine service: points for serving other peers, observed contribution.

Two in-process services on one local swarm: the first runs the demo server; the second joins it as a
private-swarm peer with only the first one's invite (/api/status) and chats with the demo model, so the
first one's host serves another peer's requests and its points rise.
"""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from contract.invites import parse_invite
from engine.api.app import create_app
from engine.service import EngineService, GenerationRequest, ServiceConfig
from engine.service.text import Finished

pytestmark = pytest.mark.slow

TOKEN = "ledger-test-token"


def _chat(service: EngineService, max_tokens: int = 6) -> Finished:
    model = service.list_models()[0]["id"]
    request = GenerationRequest(model=model, prompt="Hello swarm", max_tokens=max_tokens, temperature=0)
    events = list(service.generate(request, threading.Event()))
    assert isinstance(events[-1], Finished)
    return events[-1]


def test_stats_show_ledger_points_after_serving_another_peer(tmp_path):
    first = EngineService(ServiceConfig(data_dir=tmp_path / "first", swarm="local", demo_model="tiny"))
    second = None
    try:
        first.start(wait=True)
        assert first.status()["ready"], first.status()
        api = TestClient(create_app(first, TOKEN), base_url="http://127.0.0.1")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        before = api.get("/api/stats", headers=headers).json()
        assert before["points"] == 0.0 and before["priority"] == 1.0

        # Our own chat earns nothing (work for ourselves), but the ledger sees the demo server's work.
        _chat(first)
        assert api.get("/api/stats", headers=headers).json()["points"] == 0.0
        swarm = api.get("/api/swarm", headers=headers).json()
        (demo,) = swarm["servers"]
        assert demo["observed_contribution"] is not None
        assert demo["cache_tokens_left"] > 0 and demo["quant_type"] and demo["reachability"] == "direct"
        (indexed,) = swarm["models"]
        assert indexed["dht_prefix"] == swarm["dht_prefix"]
        assert indexed["complete"] and indexed["servers"] == 1
        assert demo["observed_contribution"]["consumed_token_blocks"] > 0

        # The second engine is given only the first one's invite (Settings › Join with an invite).
        status = api.get("/api/status", headers=headers).json()
        assert status["addresses"] and set(parse_invite(status["invite"])) == set(status["addresses"])
        peers = parse_invite(status["invite"])
        second = EngineService(
            ServiceConfig(
                data_dir=tmp_path / "second",
                swarm="private",
                initial_peers=peers,
                demo_server=False,
                demo_model="tiny",
            )
        )
        second.start(wait=True)
        assert second.status()["ready"], second.status()
        assert parse_invite(second.status()["invite"]) == peers  # it can invite others to the same swarm
        finished = _chat(second)
        assert finished.completion_tokens > 0

        stats = api.get("/api/stats", headers=headers).json()
        assert stats["points"] > 0.0 and stats["priority"] > 1.0
        assert stats["points"] == pytest.approx(first.ledger.summary()["points"], rel=0.05)
    finally:
        if second is not None:
            second.close()
        first.close()
