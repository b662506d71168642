"""Swarm presets and DHT start-up argument checks (no DHT is started here)."""

import pytest

from engine.swarm.dht_node import start_dht, validate_initial_peers
from engine.swarm.presets import PETALS_PUBLIC_INITIAL_PEERS, get_preset


def test_presets():
    public = get_preset("public")
    assert public.initial_peers == PETALS_PUBLIC_INITIAL_PEERS and not public.new_swarm
    assert len(public.initial_peers) == 6 and all("/p2p/Qm" in peer for peer in public.initial_peers)
    validate_initial_peers(public.initial_peers)
    assert get_preset("local").new_swarm and get_preset("local").initial_peers == ()
    peer = "/ip4/10.0.0.2/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
    assert get_preset("private", [peer]).initial_peers == (peer,)


def test_preset_errors():
    with pytest.raises(ValueError, match="initial-peers"):
        get_preset("private")
    with pytest.raises(ValueError, match="unknown swarm preset"):
        get_preset("nope")


def test_start_dht_argument_errors():
    with pytest.raises(ValueError, match=r"--initial-peers .* or --new-swarm"):
        start_dht(None)
    with pytest.raises(ValueError, match="not a multiaddr"):
        start_dht(["/ip4/127.0.0.1/tcp/31337"])  # no /p2p/ peer id
    with pytest.raises(ValueError, match="not a multiaddr"):
        start_dht(["localhost:31337"])
    with pytest.raises(ValueError, match="new-swarm"):
        start_dht(list(PETALS_PUBLIC_INITIAL_PEERS[:1]), new_swarm=True)
