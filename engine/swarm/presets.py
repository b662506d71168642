"""Known swarms as data: the public Petals swarm, a local demo swarm, and a private swarm of your own."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# Bootstrap peers of the public Petals swarm, as published in Petals' constants.py (PUBLIC_INITIAL_PEERS).
PETALS_PUBLIC_INITIAL_PEERS = (
    # IPv4 DNS addresses
    "/dns/bootstrap1.petals.dev/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
    "/dns/bootstrap2.petals.dev/tcp/31338/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
    # IPv6 DNS addresses
    "/dns6/bootstrap1.petals.dev/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
    "/dns6/bootstrap2.petals.dev/tcp/31338/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
    # Reserved IPs
    "/ip4/159.89.214.152/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
    "/ip4/159.203.156.48/tcp/31338/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
)


@dataclasses.dataclass(frozen=True)
class SwarmPreset:
    """A swarm to join: its bootstrap peers, or ``new_swarm=True`` to start one from this machine."""

    name: str
    initial_peers: tuple[str, ...]
    description: str
    new_swarm: bool = False


PRESETS = {
    "public": SwarmPreset(
        "public",
        PETALS_PUBLIC_INITIAL_PEERS,
        "The public Petals swarm: share with and use models served by volunteers worldwide.",
    ),
    "local": SwarmPreset(
        "local",
        (),
        "A new swarm on this machine (demo and testing); others join with its printed address.",
        new_swarm=True,
    ),
    "private": SwarmPreset(
        "private",
        (),
        "Your own swarm: give the multiaddrs of one or more of its peers.",
    ),
}


def get_preset(name: str, initial_peers: Sequence[str] | None = None) -> SwarmPreset:
    """The preset called ``name``; "private" needs ``initial_peers`` (the others ignore them)."""
    if name not in PRESETS:
        raise ValueError(f"unknown swarm preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if name == "private":
        peers = tuple(initial_peers or ())
        if not peers:
            raise ValueError("the private swarm preset needs --initial-peers (multiaddrs of its peers)")
        preset = dataclasses.replace(preset, initial_peers=peers)
    return preset
