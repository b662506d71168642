"""`python -m engine.cli serve` as a child: serves, stops gracefully on SIGTERM, vanishes on kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from engine.models.span import load_block_span
from engine.swarm.discovery import get_block_infos
from engine.swarm.records import ServerState
from tests.helpers.servers import WireClient, running_server_process, wait_for

pytestmark = pytest.mark.slow


def _state(dht, prefix, peer_id, block):
    record = get_block_infos(dht, prefix, 4)[block].get(peer_id)
    return record.state if record is not None else None


def test_serve_process_serves_then_announces_offline_on_sigterm(
    tiny_checkpoint_factory, bootstrap_dht, bootstrap
):
    checkpoint = tiny_checkpoint_factory("llama", num_layers=4)
    dht, peers = bootstrap_dht, bootstrap
    with running_server_process(checkpoint, peers, "--blocks", "1:3", "--dht-prefix", "proc") as server:
        assert server.multiaddrs and server.peer_id in server.multiaddrs[0]
        assert wait_for(lambda: _state(dht, "proc", server.peer_id, 1) == ServerState.ONLINE, timeout=20)
        hidden = torch.randn(1, 4, 64)
        with WireClient(server.multiaddrs) as client:
            output = client.forward("proc.1 proc.2", hidden)
        assert torch.allclose(output, load_block_span(checkpoint, 1, 3).forward(hidden), atol=1e-5)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert wait_for(lambda: _state(dht, "proc", server.peer_id, 1) == ServerState.OFFLINE, timeout=20)
        assert any(line.startswith("stopping") for line in server.output)


def test_serve_process_killed_leaves_no_goodbye(tiny_checkpoint_factory, bootstrap_dht, bootstrap):
    checkpoint = tiny_checkpoint_factory("llama", num_layers=4)
    dht, peers = bootstrap_dht, bootstrap
    with running_server_process(checkpoint, peers, "--blocks", "0:2", "--dht-prefix", "killed") as server:
        assert wait_for(lambda: _state(dht, "killed", server.peer_id, 0) == ServerState.ONLINE, timeout=20)
        server.kill()
        assert server.process.returncode == -signal.SIGKILL
        # No OFFLINE announcement: the record stays until it expires (clients find out by failing requests).
        assert _state(dht, "killed", server.peer_id, 0) == ServerState.ONLINE


def test_serve_reports_bad_arguments(tiny_checkpoint_factory, bootstrap):
    checkpoint = tiny_checkpoint_factory("llama", num_layers=4)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            str(checkpoint),
            "--blocks",
            "2:9",
            "--new-swarm",
            "--host",
            "127.0.0.1",
            "--throughput",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "the model has 4 blocks" in result.stderr
