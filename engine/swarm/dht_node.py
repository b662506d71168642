"""Starting this machine's DHT peer, with errors a user can act on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hivemind import DHT
from hivemind.utils.multiaddr import Multiaddr


class SwarmConnectionError(RuntimeError):
    """The DHT peer could not start or could not reach any of the swarm's initial peers."""


def validate_initial_peers(initial_peers: Sequence[str]) -> list[str]:
    """The peers as strings if each is a multiaddr ending in ``/p2p/<peer id>``; else raise ValueError."""
    peers = []
    for peer in initial_peers:
        try:
            address = Multiaddr(str(peer))
            address.value_for_protocol("p2p")
        except Exception as e:  # multiaddr raises several unrelated types for bad input
            raise ValueError(
                f"initial peer {peer!r} is not a multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/Qm...: {e}"
            ) from e
        peers.append(str(peer))
    return peers


def _listen_address(host: str, port: int) -> str:
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    family = "ip6" if ":" in host else "ip4"
    return f"/{family}/{host}/tcp/{port}"


def start_dht(
    initial_peers: Sequence[str] | None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    new_swarm: bool = False,
    client_mode: bool = False,
    startup_timeout: float = 60.0,
    **kwargs: Any,
) -> DHT:
    """Start a hivemind DHT peer listening on ``host:port`` (0 = any free port) and join the swarm.

    Either ``initial_peers`` (join an existing swarm) or ``new_swarm=True`` (be its first peer) is required.
    ``client_mode`` peers can query and announce but are not reachable by others (behind NAT, no relay).
    Extra keyword arguments go to ``hivemind.DHT`` (e.g. ``announce_maddrs``, ``identity_path``).
    Raises ValueError for bad arguments and SwarmConnectionError when no initial peer answers.
    """
    peers = validate_initial_peers(initial_peers or ())
    if not peers and not new_swarm:
        raise ValueError(
            "no initial peers: pass --initial-peers (multiaddrs of peers in the swarm to join) "
            "or --new-swarm to start a new swarm"
        )
    if peers and new_swarm:
        raise ValueError("--new-swarm starts a swarm of its own; do not pass --initial-peers with it")
    kwargs.setdefault("host_maddrs", [_listen_address(host, port)])
    dht = DHT(initial_peers=peers, start=False, client_mode=client_mode, **kwargs)
    try:
        dht.run_in_background(await_ready=True, timeout=startup_timeout)
    except Exception as e:
        dht.shutdown()
        if "bootstrap" in str(e) or "ping" in str(e):
            raise SwarmConnectionError(
                f"could not reach any of the initial peers {peers}: check the addresses and your network "
                "connection, or pass --new-swarm to start a swarm of your own"
            ) from e
        raise SwarmConnectionError(f"could not start the DHT peer on {kwargs['host_maddrs']}: {e}") from e
    return dht
