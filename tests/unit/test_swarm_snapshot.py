"""SwarmSnapshot: spans merged like Petals' compute_spans, coverage and holes."""

from engine.swarm.discovery import parse_block_entries, parse_models_index
from engine.swarm.records import ModelInfo, ServerInfo, ServerState
from engine.swarm.snapshot import SwarmSnapshot

ONLINE, JOINING, OFFLINE = ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE
PEER_A = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
PEER_B = "QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5"


def info(state=ONLINE, throughput=1.0, **fields) -> ServerInfo:
    return ServerInfo(state, throughput, **fields)


def test_consecutive_blocks_merge_into_one_span_per_server():
    # Records without start_block/end_block (Petals 2.2): spans come from the blocks each peer announces.
    a, b = info(), info(JOINING, 2.0)
    snapshot = SwarmSnapshot("m", [{"a": a}, {"a": a, "b": b}, {"a": a, "b": b}, {}])
    spans = snapshot.spans(JOINING)
    assert [(s.peer_id, s.start, s.end) for s in spans] == [("a", 0, 3), ("b", 1, 3)]
    assert [(s.peer_id, s.start, s.end) for s in snapshot.spans()] == [("a", 0, 3)]  # default: ONLINE only
    assert snapshot.coverage() == (1, 1, 1, 0) and snapshot.coverage(JOINING) == (1, 2, 2, 0)
    assert snapshot.missing_blocks() == [3] and not snapshot.is_complete()


def test_announced_bounds_are_trusted_and_clipped():
    a = info(start_block=2, end_block=9)
    snapshot = SwarmSnapshot("m", [{}, {}, {"a": a}, {}, {}])  # only block 2 was found in the DHT
    (span,) = snapshot.spans()
    assert (span.start, span.end, span.length) == (2, 5, 3)


def test_best_state_wins_and_offline_is_ignored():
    joining, online = info(JOINING), info(ONLINE)
    snapshot = SwarmSnapshot("m", [{"a": joining}, {"a": online}, {"a": online}, {"c": info(OFFLINE)}])
    assert [(s.peer_id, s.start, s.end, s.state) for s in snapshot.spans(JOINING)] == [("a", 1, 3, ONLINE)]
    assert snapshot.missing_blocks(JOINING) == [3]


def test_from_servers_and_throughputs():
    snapshot = SwarmSnapshot.from_servers(
        "m",
        4,
        {
            "a": info(throughput=2.0, start_block=0, end_block=2),
            "b": info(JOINING, 1.0, start_block=1, end_block=4),
        },
    )
    assert snapshot.block_throughputs() == [2.0, 3.0, 1.0, 1.0]
    assert snapshot.block_throughputs(ONLINE) == [2.0, 2.0, 0.0, 0.0]
    assert snapshot.is_complete(JOINING)


def test_snapshot_is_immutable():
    blocks = [{"a": info()}]
    snapshot = SwarmSnapshot("m", blocks)
    blocks[0]["b"] = info()  # the caller's dict changing later does not change the snapshot
    assert list(snapshot.blocks[0]) == ["a"]


def test_parse_block_entries_skips_invalid_entries():
    good = info(start_block=0, end_block=1).to_tuple()
    entries = {PEER_A: good, PEER_B: (9, 1.0, {}), "not a peer id": good, 5: good}
    assert list(parse_block_entries("m.0", entries)) == [PEER_A]
    assert parse_block_entries("m.0", None) == {}
    assert parse_block_entries("m.0", (2, 1.0, {})) == {}  # a plain value instead of a dictionary


def test_parse_models_index_skips_invalid_entries():
    entries = {
        "good-hf": {"num_blocks": 4, "repository": None},
        "bad.prefix": {"num_blocks": 4},
        "x": (4, None),
    }
    assert parse_models_index(entries) == {"good-hf": ModelInfo(4)}
    assert parse_models_index(None) == {}
