"""Module-scoped swarm fixtures shared by the engine's in-process swarm tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bootstrap_dht():
    """A new swarm's first DHT peer on 127.0.0.1 for the whole module (tests read records with it)."""
    from engine.swarm.dht_node import start_dht

    dht = start_dht(None, host="127.0.0.1", new_swarm=True)
    try:
        yield dht
    finally:
        dht.shutdown()


@pytest.fixture(scope="module")
def bootstrap(bootstrap_dht):
    """That peer's multiaddrs: the initial peers of servers and clients."""
    return [str(a) for a in bootstrap_dht.get_visible_maddrs()]


@pytest.fixture(scope="module")
def client_dht(bootstrap):
    """A client-mode DHT peer in that swarm, for DistributedModelForCausalLM."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    from engine.swarm.dht_node import start_dht

    dht = start_dht(bootstrap, client_mode=True)
    try:
        yield dht
    finally:
        # The clients' p2p replica lives on hivemind's worker loop: close it there, not at interpreter exit.
        replica = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        RemoteExpertWorker.run_coroutine(replica.shutdown())
        dht.shutdown()
