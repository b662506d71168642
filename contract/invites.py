"""Invites to a private swarm: a short token that carries the addresses of peers to join through.

Like mesh-llm's invite tokens: one line to copy from the machine that created the swarm and paste on the
machine that joins. Standard library only (the app makes and checks tokens too). The token is
"pollinate-invite-1." followed by URL-safe base64 of the zlib-compressed, newline-joined multiaddresses.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Sequence

from contract.addresses import peer_address_problem

PREFIX = "pollinate-invite-1."
MAX_ADDRESSES = 16
MAX_TOKEN_LENGTH = 4096


class InviteError(ValueError):
    """A pasted invite that cannot be used; the message says why, in a sentence."""


def _rank(address: str) -> int:
    # Addresses other machines can dial first; loopback last (it works only on the same machine).
    if "/127." in address or "/ip6/::1/" in address:
        return 2
    return 1 if "/p2p-circuit" in address else 0


def make_invite(addresses: Sequence[str]) -> str:
    """The token for these peer multiaddresses (each must end in /p2p/PEER_ID)."""
    usable = []
    for address in addresses:
        problem = peer_address_problem(address)
        if problem:
            raise InviteError(f"cannot invite through {address!r}: {problem}")
        if address not in usable:
            usable.append(address)
    if not usable:
        raise InviteError("there is no address to invite through yet: the engine has not joined a swarm")
    usable = sorted(usable, key=_rank)[:MAX_ADDRESSES]
    packed = zlib.compress("\n".join(usable).encode(), 9)
    return PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")


def parse_invite(token: str) -> tuple[str, ...]:
    """The peer addresses an invite carries; raises InviteError with what is wrong."""
    token = "".join(str(token).split())  # line breaks and spaces from copying are harmless
    if not token:
        raise InviteError("paste the invite you were given (it starts with pollinate-invite-1.)")
    if not token.startswith(PREFIX):
        if token.startswith("pollinate-invite-"):
            raise InviteError("this invite was made by another version of Pollinate; ask for a new one")
        raise InviteError("this is not a Pollinate invite: an invite starts with pollinate-invite-1.")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InviteError("this invite is too long to be real; copy it again")
    body = token[len(PREFIX) :]
    damaged = InviteError("this invite is damaged (a part may be missing); copy all of it again")
    try:
        packed = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        inflate = zlib.decompressobj()
        text = inflate.decompress(packed, MAX_TOKEN_LENGTH * 4).decode()
    except (binascii.Error, ValueError, zlib.error, UnicodeDecodeError):
        raise damaged from None
    if not inflate.eof:  # a cut-off token inflates without error, but never to the end of its stream
        raise damaged
    addresses = tuple(line for line in text.split("\n") if line)
    if not addresses or len(addresses) > MAX_ADDRESSES:
        raise InviteError("this invite holds no usable address; ask for a new one")
    for address in addresses:
        problem = peer_address_problem(address)
        if problem:
            raise InviteError(f"this invite holds an unusable address: {problem}")
    return addresses
