"""Pure functions of the ledger: decay, credit, priority, queue delay, eviction order. No I/O, no clocks.

Every function takes `now` (seconds, wall clock) and a LedgerPolicy, so the scheme can be tested on
made-up histories.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LedgerPolicy:
    """How credit is earned, how it decays, and how it turns into a place in the queue."""

    # Seconds a task of a peer without credit (newcomer, free-rider, Petals client) is placed behind work of
    # a peer with unbounded credit. It is also the aging bound: such a task is only overtaken by tasks that
    # arrive within this many seconds after it.
    base_delay: float = 1.0
    # Credit (points) at which a peer's priority doubles, so its delay halves.
    credit_scale: float = 10.0
    # Half-life of all credit and points, in seconds: old favours fade.
    half_life: float = 3 * 24 * 3600.0
    # Tokens x blocks of work that make one point (work this node received from a peer, or served).
    token_blocks_per_point: float = 1000.0
    # Points per block-hour of a verified server's observed ONLINE time (on blocks we can check).
    points_per_block_hour: float = 1.0
    # A passed probe vouches for the peer's ONLINE time for this long; after that it must pass again.
    verified_for: float = 1800.0
    # Longest gap between two observations that still counts as ONLINE time (missed rounds earn nothing).
    max_online_gap: float = 300.0
    # After a wrong answer to a probe: all credit of that peer is gone, and it earns none for this long.
    lie_penalty: float = 7 * 24 * 3600.0
    # Most peers kept in the ledger; the least valuable (then the oldest) are evicted beyond it.
    max_peers: int = 5000

    def __post_init__(self) -> None:
        for name in ("base_delay", "credit_scale", "half_life", "token_blocks_per_point"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"LedgerPolicy.{name} must be a positive number, got {value!r}")
        for name in ("points_per_block_hour", "verified_for", "max_online_gap", "lie_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LedgerPolicy.{name} must be a non-negative number, got {value!r}")
        if not isinstance(self.max_peers, int) or self.max_peers < 1:
            raise ValueError(f"LedgerPolicy.max_peers must be a positive int, got {self.max_peers!r}")


def decayed(value: float, as_of: float, now: float, half_life: float) -> float:
    """`value` recorded at `as_of`, halved every `half_life` seconds until `now` (never grows)."""
    elapsed = max(0.0, now - as_of)
    return value * 0.5 ** (elapsed / half_life)


def work_points(token_blocks: float, policy: LedgerPolicy) -> float:
    """Points for `token_blocks` (tokens x blocks) of computed work."""
    return max(0.0, token_blocks) / policy.token_blocks_per_point


def online_points(seconds: float, blocks: int, policy: LedgerPolicy) -> float:
    """Points for `seconds` of verified ONLINE time on `blocks` checkable blocks (gap capped by policy)."""
    seconds = min(max(0.0, seconds), policy.max_online_gap)
    return seconds / 3600.0 * max(0, blocks) * policy.points_per_block_hour


def priority_of(credit: float, policy: LedgerPolicy) -> float:
    """A peer's priority (higher = sooner): 1.0 without credit, doubling at every `credit_scale` points."""
    return 1.0 + max(0.0, credit) / policy.credit_scale


def queue_delay(priority: float, policy: LedgerPolicy) -> float:
    """The TaskPool delay (seconds, lower = sooner) for a priority: `base_delay / priority`, in (0, base]."""
    return policy.base_delay / max(1.0, priority)


def eviction_order(values: Iterable[tuple[str, float, float]]) -> list[str]:
    """Peer ids to evict first: (peer_id, value, last_seen) sorted by least value, then longest unseen."""
    return [peer for peer, _, _ in sorted(values, key=lambda item: (item[1], item[2], item[0]))]
