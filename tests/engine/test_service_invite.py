"""Private swarms by invitation, end to end with two in-process engines.

The first engine runs the local swarm with its demo servers; its status carries the addresses others can
join through and an invite made of them. The second engine is given only that invite, joins as a private
swarm, chats through the first one's servers, and the first one's points rise (its ledger, via the API).
(An engine that creates a private swarm listens on every interface instead of 127.0.0.1; see the
`creates_private_swarm` check below.)
"""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from contract.invites import parse_invite
from engine.api.app import create_app
from engine.service import EngineService, GenerationRequest, ServiceConfig
from engine.service.text import Finished
from tests.helpers.servers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = "invite-test-token"


def test_second_engine_joins_by_invite_and_earns_the_first_one_points(tmp_path):
    assert EngineService(ServiceConfig(data_dir=tmp_path / "x", swarm="private")).creates_private_swarm
    first = EngineService(ServiceConfig(data_dir=tmp_path / "first", swarm="local"))
    second = None
    try:
        first.start(wait=True)
        api = TestClient(create_app(first, TOKEN), base_url="http://127.0.0.1")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        status = api.get("/api/status", headers=headers).json()
        assert status["ready"] and status["addresses"], status
        assert set(parse_invite(status["invite"])) == set(status["addresses"])
        assert api.get("/api/stats", headers=headers).json()["points"] == 0.0

        peers = parse_invite(status["invite"])  # all the second engine is given
        second = EngineService(
            ServiceConfig(data_dir=tmp_path / "second", swarm="private", initial_peers=peers)
        )
        second.start(wait=True)
        assert second.status()["ready"], second.status()
        model = second.list_models()[0]["id"]
        request = GenerationRequest(model=model, prompt="Hello swarm", max_tokens=6, temperature=0)
        events = list(second.generate(request, threading.Event()))
        assert isinstance(events[-1], Finished) and events[-1].completion_tokens > 0

        assert wait_for(lambda: api.get("/api/stats", headers=headers).json()["points"] > 0.0, timeout=30)
        # The joined engine can invite others too: its invite carries the swarm's own addresses.
        assert parse_invite(second.status()["invite"]) == peers
    finally:
        if second is not None:
            second.close()
        first.close()
