"""Reachability: the verdict from dial-back answers, the advice a user gets, and how records carry it."""

from engine.swarm.health import server_reachability
from engine.swarm.reachability import (
    has_relay_address,
    listening_port,
    reachability_advice,
    reachability_verdict,
)
from engine.swarm.records import ServerInfo, ServerState


def test_verdict_follows_the_share_of_helpers_that_dialled_back():
    assert reachability_verdict(2, 3, relayed=False) == "reachable"
    assert reachability_verdict(1, 2, relayed=False) == "reachable"  # half is enough, as in Petals
    assert reachability_verdict(1, 3, relayed=False) == "unreachable"
    assert reachability_verdict(0, 4, relayed=True) == "relayed"
    assert reachability_verdict(0, 0, relayed=False) == "unknown"  # nobody could check
    assert reachability_verdict(0, 0, relayed=True) == "relayed"


def test_advice_names_the_port_to_forward():
    assert "forward TCP port 31337 from your router" in reachability_advice("unreachable", 31337)
    relayed = reachability_advice("relayed", 31337)
    assert "relay" in relayed and "31337" in relayed
    assert "Pollinate's port" in reachability_advice("unreachable", None)
    assert reachability_advice("reachable", 31337) is None and reachability_advice("unknown", None) is None


def test_port_and_relay_from_multiaddrs():
    direct = "/ip4/192.168.1.5/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
    relay = "/ip4/1.2.3.4/tcp/4001/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5/p2p-circuit"
    assert listening_port([relay, direct]) == 31337
    assert listening_port([relay]) is None and listening_port([]) is None
    assert has_relay_address([direct, relay]) and not has_relay_address([direct])


def test_records_carry_our_verdict_and_the_health_view_prefers_it():
    record = ServerInfo(ServerState.ONLINE, 1.0, using_relay=False, reachability="unreachable")
    parsed = ServerInfo.from_tuple(record.to_tuple())
    assert parsed.reachability == "unreachable" and server_reachability(parsed) == "unreachable"
    state, throughput, extra = record.to_tuple()
    future = ServerInfo.from_tuple((state, throughput, {**extra, "reachability": "teleported"}))
    assert future.reachability is None and server_reachability(future) == "direct"  # falls back to the flag
    assert server_reachability(ServerInfo(ServerState.ONLINE, 1.0, reachability="relayed")) == "relayed"
    assert server_reachability(ServerInfo(ServerState.ONLINE, 1.0, reachability="reachable")) == "direct"
    petals = ServerInfo(ServerState.ONLINE, 1.0, using_relay=True)  # Petals: no verdict of ours, the flag
    assert "reachability" not in petals.to_tuple()[2] and server_reachability(petals) == "relayed"
