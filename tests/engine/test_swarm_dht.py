"""Announce and discover between real hivemind DHT peers on 127.0.0.1 (one pair per module, ~2 s to start)."""

import time

import pytest
from hivemind.utils import get_dht_time

from engine.swarm.announce import Announcer, declare_blocks, default_expiration
from engine.swarm.dht_node import SwarmConnectionError, start_dht
from engine.swarm.discovery import fetch_snapshot, get_block_infos, list_models
from engine.swarm.keys import block_uids
from engine.swarm.records import ModelInfo, ServerInfo, ServerState

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"


@pytest.fixture(scope="module")
def peers():
    """(server, reader): a new swarm's first peer and a second peer that joined it."""
    server = start_dht(None, new_swarm=True)
    try:
        reader = start_dht([str(addr) for addr in server.get_visible_maddrs()])
        try:
            yield server, reader
        finally:
            reader.shutdown()
    finally:
        server.shutdown()


def states(dht, prefix, num_blocks):
    return [
        {peer: info.state for peer, info in block.items()}
        for block in get_block_infos(dht, prefix, num_blocks)
    ]


def test_announcer_lifecycle_is_visible_to_other_peers(peers):
    server, reader = peers
    me = server.peer_id.to_base58()
    announcer = Announcer(
        server,
        "life-hf",
        1,
        3,
        ServerInfo(ServerState.JOINING, 2.0),
        ModelInfo(4, "https://huggingface.co/x/life"),
    )
    announcer.start()
    try:
        joining = ServerState.JOINING
        assert states(reader, "life-hf", 4) == [{}, {me: joining}, {me: joining}, {}]
        announcer.update(state=ServerState.ONLINE, cache_tokens_left=1024, wait=True)
        (span,) = fetch_snapshot(reader, "life-hf", 4).spans()
        assert (span.peer_id, span.start, span.end, span.server_info.cache_tokens_left) == (me, 1, 3, 1024)
        assert span.server_info.pollinate_protocol is not None
        assert list_models(reader)["life-hf"] == ModelInfo(4, "https://huggingface.co/x/life")
    finally:
        announcer.stop()
    offline = ServerState.OFFLINE
    assert states(reader, "life-hf", 4) == [{}, {me: offline}, {me: offline}, {}]
    assert fetch_snapshot(reader, "life-hf", 4).spans(ServerState.JOINING) == []


def test_records_expire_unless_reannounced(peers):
    server, reader = peers
    stored = declare_blocks(
        server, block_uids("gone-hf", 0, 2), ServerInfo(ServerState.ONLINE, 1.0), get_dht_time() + 1.0
    )
    assert stored == {"gone-hf.0": True, "gone-hf.1": True}
    assert all(get_block_infos(reader, "gone-hf", 2))
    # An announcer re-declares every period, so its records outlive a single expiration (2 x period).
    announcer = Announcer(
        server, "kept-hf", 0, 1, ServerInfo(ServerState.ONLINE, 1.0), update_period=0.5, expiration=1.0
    )
    announcer.start()
    try:
        time.sleep(1.5)
        assert get_block_infos(reader, "gone-hf", 2) == [{}, {}]
        assert get_block_infos(reader, "kept-hf", 1)[0]
    finally:
        announcer.stop()
    assert default_expiration(60) == 120 and default_expiration(0.5) == 3  # hivemind's max clock skew


def test_malformed_records_are_skipped(peers):
    server, reader = peers
    me = server.peer_id.to_base58()
    expiration = get_dht_time() + 30
    server.store("junk-hf.0", (2, 1.0, {}), expiration, subkey=me)
    server.store("junk-hf.0", (2, 1.0, {}), expiration, subkey="not-a-peer-id")
    server.store("junk-hf.1", (7, "fast", None), expiration, subkey=me)  # bad state and throughput
    server.store("junk-hf.2", "not a dictionary", expiration)
    blocks = get_block_infos(reader, "junk-hf", 3)
    assert list(blocks[0]) == [me] and blocks[1:] == [{}, {}]
    server.store("_petals.models", {"num_blocks": "four"}, expiration, subkey="junk-hf")
    assert "junk-hf" not in list_models(reader)


def test_private_prefix_stays_out_of_the_model_index(peers):
    server, reader = peers
    announcer = Announcer(server, "_private", 0, 1, ServerInfo(ServerState.ONLINE, 1.0), ModelInfo(1))
    announcer.start()
    try:
        assert "_private" not in list_models(reader)
        assert get_block_infos(reader, "_private", 1)[0]
    finally:
        announcer.stop()


def test_unreachable_initial_peers_give_a_clear_error():
    with pytest.raises(SwarmConnectionError, match="could not reach any of the initial peers"):
        start_dht([UNREACHABLE], startup_timeout=30)
