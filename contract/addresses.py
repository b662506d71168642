"""Checking a peer's multiaddress as a person types it (standard library only: the app uses it too).

Accepts what the swarm needs to dial a peer: a network part (/ip4, /ip6, /dns, /dns4, /dns6), a transport
(/tcp/PORT, or /udp/PORT/quic or /quic-v1), optional relays (/p2p/ID/p2p-circuit), ending in /p2p/PEER_ID.
"""

from __future__ import annotations

import ipaddress
import re

_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]+$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW…"


def _port(text: str, what: str) -> str | None:
    if not text.isdigit() or not 0 < int(text) < 65536:
        return f"{what} port {text!r} must be a number from 1 to 65535"
    return None


def peer_address_problem(address: str) -> str | None:
    """What is wrong with `address` as a peer to join, in a sentence; None when it is usable."""
    address = address.strip()
    if not address.startswith("/"):
        return f"{address!r} is not a multiaddress: it starts with /ip4/, /ip6/ or /dns/, like {EXAMPLE}"
    parts = address.split("/")[1:]
    if len(parts) < 2:
        return f"{address!r} is incomplete; a peer looks like {EXAMPLE}"
    kind, value, rest = parts[0], parts[1], parts[2:]
    if kind == "ip4" or kind == "ip6":
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return f"{value!r} is not an IP address ({kind})"
        if (ip.version == 4) != (kind == "ip4"):
            return f"{value!r} is not an {kind} address"
    elif kind in ("dns", "dns4", "dns6"):
        if not _HOSTNAME.match(value):
            return f"{value!r} is not a host name"
    else:
        return f"{address!r} must start with /ip4/, /ip6/, /dns/, /dns4/ or /dns6/ (not /{kind}/)"
    if len(rest) < 2:
        return f"{address!r} lacks the port: add /tcp/PORT, like {EXAMPLE}"
    transport, port, rest = rest[0], rest[1], rest[2:]
    if transport == "tcp":
        problem = _port(port, "the TCP")
    elif transport == "udp":
        problem = _port(port, "the UDP")
        if not problem:
            if not rest or rest[0] not in ("quic", "quic-v1"):
                return f"{address!r}: after /udp/{port} comes /quic or /quic-v1"
            rest = rest[1:]
    else:
        return f"{address!r}: the transport must be /tcp/PORT (or /udp/PORT/quic), not /{transport}/"
    if problem:
        return problem
    peer_ids = []
    while rest:
        if rest[0] == "p2p-circuit":
            rest = rest[1:]
            continue
        if rest[0] not in ("p2p", "ipfs") or len(rest) < 2:
            return f"{address!r} must end with /p2p/PEER_ID (the peer's id), like {EXAMPLE}"
        peer_ids.append(rest[1])
        rest = rest[2:]
    if not peer_ids:
        return f"{address!r} lacks the peer id: add /p2p/PEER_ID, like {EXAMPLE}"
    for peer_id in peer_ids:
        if not _BASE58.match(peer_id) or not 40 <= len(peer_id) <= 60:
            return f"{peer_id!r} is not a peer id (46 or 52 letters and digits, like Qm… or 12D3KooW…)"
    return None
