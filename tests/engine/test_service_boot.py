"""A swarm the engine cannot reach: one sentence a person can act on, no addresses, no command-line flags."""

from __future__ import annotations

import socket

import pytest

from engine.service import EngineService, ServiceConfig
from engine.service.errors import EngineNotReadyError

pytestmark = pytest.mark.slow  # a DHT peer process that waits for its bootstrap to time out


def test_unreachable_private_swarm_is_one_actionable_sentence(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    peer = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWCNSLFe2PXo7dHyH8A27vxBMfKKuAJEa9rnvzwW5sLjEc"
    service = EngineService(ServiceConfig(data_dir=tmp_path, swarm="private", initial_peers=(peer,)))
    try:
        service.start(wait=True)
        status = service.status()
        with pytest.raises(EngineNotReadyError) as refused:  # an API request: why, not "try again soon"
            service.core.require_ready()
    finally:
        service.close(timeout=10)
    assert status["state"] == "error" and status["ready"] is False
    message = status["message"]
    assert message.startswith("Cannot reach your private swarm") and "Retry" in message
    assert "/ip4/" not in message and "--" not in message
    refusal = str(refused.value)
    assert refusal.startswith("Cannot reach your private swarm") and "Restart the engine" in refusal
