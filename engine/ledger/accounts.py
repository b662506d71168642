"""The ledger's records: usage counters, decaying credit, one account per peer, and their JSON form.

`from_dict` validates everything it reads (a ledger file may be damaged); a bad value raises ValueError.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.ledger.priority import decayed


def _number(raw: Any, name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw < 0:
        raise ValueError(f"ledger field {name} must be a non-negative number, got {raw!r:.40}")
    return float(raw)


def _count(raw: Any, name: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"ledger field {name} must be a non-negative int, got {raw!r:.40}")
    return raw


@dataclass
class Usage:
    """Work done in one direction: requests, tokens, tokens x blocks, compute seconds (never decays)."""

    requests: int = 0
    tokens: int = 0
    token_blocks: int = 0
    compute_seconds: float = 0.0

    def add(self, tokens: int, blocks: int, seconds: float, requests: int = 1) -> None:
        self.requests += max(0, int(requests))
        self.tokens += max(0, int(tokens))
        self.token_blocks += max(0, int(tokens)) * max(0, int(blocks))
        self.compute_seconds += max(0.0, float(seconds))

    @classmethod
    def from_dict(cls, raw: Any) -> Usage:
        if not isinstance(raw, dict):
            raise ValueError("ledger usage must be a dict")
        return cls(
            requests=_count(raw.get("requests", 0), "requests"),
            tokens=_count(raw.get("tokens", 0), "tokens"),
            token_blocks=_count(raw.get("token_blocks", 0), "token_blocks"),
            compute_seconds=_number(raw.get("compute_seconds", 0.0), "compute_seconds"),
        )


@dataclass
class Decaying:
    """A non-negative amount that halves every half-life; stored as (value, as_of) and decayed lazily."""

    value: float = 0.0
    as_of: float = 0.0

    def at(self, now: float, half_life: float) -> float:
        return decayed(self.value, self.as_of, now, half_life)

    def add(self, amount: float, now: float, half_life: float) -> None:
        self.value = self.at(now, half_life) + max(0.0, amount)
        self.as_of = max(now, self.as_of)

    @classmethod
    def from_dict(cls, raw: Any) -> Decaying:
        if not isinstance(raw, dict):
            raise ValueError("ledger credit must be a dict")
        value, as_of = raw.get("value", 0.0), raw.get("as_of", 0.0)
        return cls(value=_number(value, "value"), as_of=_number(as_of, "as_of"))


@dataclass
class Probes:
    """What this node verified about a peer's server by probing it."""

    passed: int = 0
    failed: int = 0  # no answer, error, timeout: not proof of lying, but no credit either
    wrong: int = 0  # answered with results that differ from our own computation
    last_probe_at: float = 0.0
    last_pass_at: float = 0.0
    last_online_at: float = 0.0  # last time its ONLINE time was credited
    online_seconds: float = 0.0  # verified ONLINE time credited so far
    banned_until: float = 0.0

    @classmethod
    def from_dict(cls, raw: Any) -> Probes:
        if not isinstance(raw, dict):
            raise ValueError("ledger probes must be a dict")
        return cls(
            **{k: _count(raw.get(k, 0), k) for k in ("passed", "failed", "wrong")},
            **{
                k: _number(raw.get(k, 0.0), k)
                for k in (
                    "last_probe_at",
                    "last_pass_at",
                    "last_online_at",
                    "online_seconds",
                    "banned_until",
                )
            },
        )


@dataclass
class PeerAccount:
    """Everything this node knows first-hand about one peer (keyed by its libp2p peer id)."""

    peer_id: str
    first_seen: float
    last_seen: float
    served: Usage = field(default_factory=Usage)  # work this node did for the peer
    consumed: Usage = field(default_factory=Usage)  # work the peer's server did for this node
    probes: Probes = field(default_factory=Probes)
    work_credit: Decaying = field(default_factory=Decaying)  # points from `consumed`
    online_credit: Decaying = field(default_factory=Decaying)  # points from verified ONLINE time
    served_points: Decaying = field(default_factory=Decaying)  # points of work this node did for it

    def credit(self, now: float, half_life: float) -> float:
        """Points this peer has earned with this node (zero while banned for lying)."""
        if self.probes.banned_until > now:
            return 0.0
        return self.work_credit.at(now, half_life) + self.online_credit.at(now, half_life)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> PeerAccount:
        if not isinstance(raw, dict):
            raise ValueError("ledger account must be a dict")
        peer_id = raw.get("peer_id")
        if not isinstance(peer_id, str) or not 0 < len(peer_id) <= 128:
            raise ValueError(f"ledger account has a bad peer id {peer_id!r:.40}")
        return cls(
            peer_id=peer_id,
            first_seen=_number(raw.get("first_seen", 0.0), "first_seen"),
            last_seen=_number(raw.get("last_seen", 0.0), "last_seen"),
            served=Usage.from_dict(raw.get("served", {})),
            consumed=Usage.from_dict(raw.get("consumed", {})),
            probes=Probes.from_dict(raw.get("probes", {})),
            work_credit=Decaying.from_dict(raw.get("work_credit", {})),
            online_credit=Decaying.from_dict(raw.get("online_credit", {})),
            served_points=Decaying.from_dict(raw.get("served_points", {})),
        )


@dataclass(frozen=True)
class PeerContribution:
    """One peer as this node sees it, for the swarm view: what it did for us, what we did for it."""

    peer_id: str
    credit: float  # decayed points earned with this node
    priority: float  # 1.0 = newcomer; higher = served sooner here
    consumed_token_blocks: int  # work its server did for us
    served_token_blocks: int  # work we did for it
    verified_online_seconds: float
    probes_passed: int
    probes_failed: int
    probes_wrong: int
    banned: bool
    last_seen: float
