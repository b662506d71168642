"""Reachability with real peers: servers ask others to dial them back and announce the verdict.

A server that accepts no incoming connection (its p2p daemon does not listen, as behind a NAT without
port forwarding) is found unreachable, gets advice, and the health view shows it so.
"""

from __future__ import annotations

import pytest

from engine.server.block_host import BlockHost
from engine.server.config import ServerConfig
from engine.swarm.dht_node import start_dht
from engine.swarm.discovery import fetch_snapshot
from engine.swarm.health import model_health
from tests.helpers.servers import running_server, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_servers_learn_and_announce_whether_peers_can_dial_them(tiny_checkpoint_factory):
    model = tiny_checkpoint_factory("llama")
    with running_server(model, new_swarm=True, start_block=0, end_block=2) as first:
        assert wait_for(lambda: first.reachability is not None, timeout=60)
        assert first.reachability.state == "unknown"  # alone in a new swarm: nobody to ask
        peers = list(first.info().multiaddrs)
        with running_server(model, peers, start_block=2, end_block=4) as second:
            assert wait_for(lambda: second.reachability is not None, timeout=60)
            verdict = second.reachability
            assert verdict.state == "reachable" and verdict.dialled_back >= 1 and verdict.advice is None
            assert verdict.port and f"/tcp/{verdict.port}/" in " ".join(second.info().multiaddrs)

            hidden_dht = start_dht(peers, client_mode=True, host_maddrs=[], no_listen=True)
            hidden = BlockHost(
                ServerConfig(model=str(model), start_block=0, end_block=4, device="cpu", throughput=1.0),
                dht=hidden_dht,
            )
            try:
                hidden.start()
                assert wait_for(lambda: hidden.reachability is not None, timeout=60)
                verdict = hidden.reachability
                assert verdict.state == "unreachable", verdict
                assert verdict.helpers_answered >= 1 and verdict.dialled_back == 0
                assert "forward" in verdict.advice and hidden.info().reachability == verdict

                prefix, num_blocks = second.info().dht_prefix, 4
                hidden_id, second_id = hidden_dht.peer_id.to_base58(), second.dht.peer_id.to_base58()

                def announced():
                    health = model_health(fetch_snapshot(first.dht, prefix, num_blocks))
                    rows = {row.peer_id: row for row in health.servers}
                    return (
                        rows if hidden_id in rows and rows[hidden_id].reachability == "unreachable" else None
                    )

                rows = wait_for(announced, timeout=30)
                assert rows, "the unreachable verdict never reached the DHT"
                assert rows[second_id].reachability == "direct"
            finally:
                hidden.stop()
                hidden_dht.shutdown()
