"""Which blocks a server should host, and when it should move: pure functions over a swarm snapshot.

The idea follows Petals: a swarm is only as fast as its weakest block, so a new server goes where the
per-block throughput is lowest, and a running server moves when moving (and letting the others settle)
would raise the swarm's bottleneck by enough.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.swarm.records import ServerState
from engine.swarm.snapshot import SwarmSnapshot

GIB = 1024**3
EPS = 1e-3  # relative nudge that makes a server prefer its current place among near-equal ones


def autograd_reserve_bytes(hidden_size: int) -> int:
    """Memory Petals keeps free for backward passes: 2 GiB for BLOOM-176B's width, proportional otherwise."""
    return int(2 * GIB * hidden_size / 14336)


def choose_num_blocks(
    free_bytes: int,
    block_bytes: int,
    cache_bytes_per_block: int,
    total_blocks: int,
    margin_bytes: int = 0,
) -> int:
    """How many blocks fit in ``free_bytes`` after keeping ``margin_bytes`` aside (0..total_blocks).

    Each block costs its weights plus its share of the attention cache. Pass ``autograd_reserve_bytes``
    (or more) as the margin to leave room for backward passes and allocator slack.
    """
    for name, value in (("free_bytes", free_bytes), ("block_bytes", block_bytes)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if cache_bytes_per_block < 0 or margin_bytes < 0 or total_blocks < 0:
        raise ValueError("cache_bytes_per_block, margin_bytes and total_blocks must be >= 0")
    per_block = block_bytes + cache_bytes_per_block
    if per_block <= 0:
        raise ValueError("a block must cost some memory (block_bytes + cache_bytes_per_block > 0)")
    usable = free_bytes - margin_bytes
    return max(0, min(usable // per_block, total_blocks))


def _throughputs(swarm: SwarmSnapshot | Sequence[float]) -> list[float]:
    if isinstance(swarm, SwarmSnapshot):
        return swarm.block_throughputs(ServerState.JOINING)
    return [float(value) for value in swarm]


def _best_start(throughputs: Sequence[float], num_blocks: int) -> int:
    # Compare windows by their weakest block, then the next weakest, and so on; ties go to the lowest start.
    # Filling the weakest block first is what raises the swarm's bottleneck.
    options = range(len(throughputs) - num_blocks + 1)
    return min(options, key=lambda start: (sorted(throughputs[start : start + num_blocks]), start))


def choose_best_blocks(num_blocks: int, swarm: SwarmSnapshot | Sequence[float]) -> tuple[int, int]:
    """The span ``(start, end)`` of ``num_blocks`` blocks where the swarm is weakest.

    ``swarm`` is a snapshot (JOINING and ONLINE servers count, as in Petals) or per-block throughputs.
    An empty swarm gives ``(0, num_blocks)``; a hole in coverage is filled before anything else.
    """
    throughputs = _throughputs(swarm)
    if not 1 <= num_blocks <= len(throughputs):
        raise ValueError(f"num_blocks must be in [1, {len(throughputs)}], got {num_blocks}")
    start = _best_start(throughputs, num_blocks)
    return start, start + num_blocks


def _add(throughputs: list[float], start: int, length: int, amount: float) -> None:
    for index in range(start, start + length):
        throughputs[index] += amount


def should_rebalance(
    local_peer_id: str,
    snapshot: SwarmSnapshot,
    balance_quality: float = 0.75,
    *,
    max_rounds: int = 100,
) -> bool:
    """True if this server should move: the swarm's bottleneck would grow by more than 1/balance_quality.

    Simulates Petals' procedure deterministically: take this server out, put it where the swarm is weakest,
    then let every server (in peer-id order) move to its own best place until nobody moves; compare the
    weakest block's throughput before and after. Never moves if leaving would open a hole in the model.
    ``balance_quality > 1`` forces a move (debugging, as in Petals).
    """
    if balance_quality > 1.0:
        return True
    spans = {
        span.peer_id: [span.start, span.length, span.throughput]
        for span in snapshot.spans(ServerState.JOINING)
    }
    if local_peer_id not in spans:
        return False  # not visible in the DHT (yet): no basis for a decision
    throughputs = snapshot.block_throughputs(ServerState.JOINING)
    initial = min(throughputs)

    start, length, own = spans[local_peer_id]
    # Removing a bit more than our share makes our current place look slightly weaker, so a tie keeps us.
    _add(throughputs, start, length, -own * (1 + EPS))
    if initial > EPS and min(throughputs) <= 0:
        return False  # leaving would make the swarm disjoint
    new_start = _best_start(throughputs, length)
    if new_start == start:
        return False
    _add(throughputs, start, length, own * EPS)
    spans[local_peer_id][0] = new_start
    _add(throughputs, new_start, length, own)

    for _ in range(max_rounds):
        moved = False
        for peer_id in sorted(spans):
            start, length, amount = spans[peer_id]
            _add(throughputs, start, length, -amount * (1 + EPS))
            best = _best_start(throughputs, length)
            _add(throughputs, start, length, amount * EPS)  # net effect so far: this server removed
            _add(throughputs, best, length, amount)
            if best != start:
                spans[peer_id][0] = best
                moved = True
        if not moved:
            break

    final = min(throughputs)
    if final < initial or final < EPS:
        return False
    return initial / final < balance_quality - EPS
