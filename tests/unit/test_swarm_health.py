"""The swarm health view: rows per server, coverage per model, choosing a model, and the text table."""

import pytest

from engine.swarm.cli import format_health
from engine.swarm.health import model_health, read_swarm_health, server_reachability
from engine.swarm.records import ModelInfo, ServerInfo, ServerState
from engine.swarm.snapshot import SwarmSnapshot

PEER_A = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
PEER_B = "QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5"
PEER_C = "QmTbqDrBxCioZMYCjTUHu5GLVERw369VkY7fBTMiKFFDXu"


def _swarm() -> SwarmSnapshot:
    petals = ServerInfo(
        ServerState.ONLINE, 120.5, public_name="petals-box", version="2.2.0.post1", torch_dtype="float16",
        quant_type="nf4", using_relay=True, cache_tokens_left=8192,
    )  # fmt: skip
    ours = ServerInfo(
        ServerState.ONLINE, 40.0, start_block=2, end_block=6, version="0.1.0", quant_type="none",
        using_relay=False, points=12.5,
    )  # fmt: skip
    leaving = ServerInfo(ServerState.OFFLINE, 1.0, start_block=0, end_block=2)
    blocks = [{PEER_A: petals, PEER_C: leaving}, {PEER_A: petals, PEER_C: leaving}]
    blocks += [{PEER_A: petals, PEER_B: ours}, {PEER_B: ours}, {PEER_B: ours}, {PEER_B: ours}, {}, {}]
    return SwarmSnapshot("Llama-2-70b-hf", blocks)


def test_rows_show_every_server_with_what_it_announces():
    health = model_health(_swarm(), "https://huggingface.co/meta-llama/Llama-2-70b-hf")
    assert health.coverage == (1, 1, 2, 1, 1, 1, 0, 0)
    assert health.missing_blocks == [6, 7] and not health.complete and health.covered_blocks == 6
    rows = {row.peer_id: row for row in health.servers}
    assert set(rows) == {PEER_A, PEER_B, PEER_C}  # offline servers too, as health.petals.dev lists them
    petals, ours, leaving = rows[PEER_A], rows[PEER_B], rows[PEER_C]
    assert (petals.start_block, petals.end_block, petals.state) == (0, 3, "online")
    assert (petals.version, petals.quant_type, petals.torch_dtype) == ("2.2.0.post1", "nf4", "float16")
    assert (petals.reachability, petals.cache_tokens_left, petals.points) == ("relayed", 8192, None)
    assert (ours.start_block, ours.end_block, ours.reachability, ours.points) == (2, 6, "direct", 12.5)
    assert (leaving.state, leaving.reachability) == ("offline", "unknown")
    assert health.to_dict()["servers"][0]["peer_id"] in rows


def test_reachability_comes_from_the_relay_flag():
    assert server_reachability(ServerInfo(ServerState.ONLINE, 1.0, using_relay=True)) == "relayed"
    assert server_reachability(ServerInfo(ServerState.ONLINE, 1.0, using_relay=False)) == "direct"
    assert server_reachability(ServerInfo(ServerState.ONLINE, 1.0)) == "unknown"


def test_read_swarm_health_reads_every_model_or_the_chosen_one():
    index = {
        "Llama-2-70b-hf": ModelInfo(8, "https://huggingface.co/meta-llama/Llama-2-70b-hf"),
        "bloom-petals": ModelInfo(70, None),
    }
    fetched = []

    def fetch(prefix, num_blocks):
        fetched.append((prefix, num_blocks))
        return _swarm() if prefix == "Llama-2-70b-hf" else SwarmSnapshot(prefix, [{}] * num_blocks)

    view = read_swarm_health(index, fetch)
    assert [m.dht_prefix for m in view] == ["Llama-2-70b-hf", "bloom-petals"]
    assert fetched == [("Llama-2-70b-hf", 8), ("bloom-petals", 70)]
    assert view[1].missing_blocks == list(range(70))
    for name in (
        "meta-llama/Llama-2-70b-hf",
        "Llama-2-70b-hf",
        "https://huggingface.co/meta-llama/Llama-2-70b-hf",
    ):
        (only,) = read_swarm_health(index, fetch, only=name)
        assert only.dht_prefix == "Llama-2-70b-hf"
    with pytest.raises(LookupError, match="bloom-petals"):
        read_swarm_health(index, fetch, only="mistralai/Mixtral-8x7B")


def test_text_table_lists_servers_and_holes():
    text = format_health([model_health(_swarm(), "https://huggingface.co/meta-llama/Llama-2-70b-hf")])
    lines = text.splitlines()
    assert "6/8 blocks covered, missing blocks 6-7, 3 servers" in lines[0]
    assert lines[1] == "  servers per block: 1 1 2 1 1 1 0 0"
    header, *rows = lines[2:]
    assert header.split()[:4] == ["name", "peer", "version", "state"]
    assert any(
        "petals-box" in row and "relayed" in row and "2.2.0.post1" in row and "0:3" in row for row in rows
    )
    assert any(PEER_B[-8:] in row and "2:6" in row and "12.5" in row for row in rows)
    assert format_health([]).startswith("The swarm's model index is empty")
