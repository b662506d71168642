"""Route choice: pure functions that pick which servers run which blocks, given a view of the swarm.

A route is a list of `Hop`s that covers blocks [start, end) in order, each hop run by one server. Inference
routes minimise the expected latency of one step (shortest path over block boundaries); batch routes
(forward/backward) prefer long, high-throughput spans. Nothing here does I/O: the sequence manager gathers
the inputs (spans from the DHT, pings, bans) and calls these functions.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field


class MissingBlocksError(RuntimeError):
    """No usable server holds some blocks of the model, so no route can cover it."""

    def __init__(self, missing_blocks: Sequence[int], *, num_blocks: int | None = None):
        self.missing_blocks = tuple(sorted(missing_blocks))
        shown = _format_ranges(self.missing_blocks)
        total = f" of {num_blocks}" if num_blocks is not None else ""
        super().__init__(
            f"No online server holds block(s) {shown}{total}: the swarm cannot run this model right now. "
            f"Wait for servers to join, or host the missing blocks yourself."
        )


@dataclass(frozen=True)
class ServerSpan:
    """What routing knows about one server: the blocks it holds and how fast it is (None = unknown)."""

    peer_id: str
    start: int
    end: int
    inference_rps: float | None = None  # blocks-steps per second for a single-token inference step
    throughput: float | None = None  # announced throughput, for batch (forward/backward) routing
    cache_tokens_left: int | None = None
    next_pings: Mapping[str, float] = field(default_factory=dict)  # RTT (s) to other servers, by peer id

    def __post_init__(self):
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid span [{self.start}, {self.end}) for peer {self.peer_id}")

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Hop:
    """One step of a route: server `peer_id` runs blocks [start, end)."""

    peer_id: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LatencyModel:
    """Constants of the inference cost model (seconds); defaults follow Petals' measured values."""

    default_rtt: float = 0.3  # if the client never pinged the server
    max_rtt: float = 10.0  # unreachable servers stay usable as a last resort
    overhead: float = 0.018  # serialization and scheduling per hop
    default_inference_rps: float = 300.0  # if a server did not announce its speed
    alloc_penalty: float = 10.0  # if a server lacks KV-cache room for this session

    def rtt(self, measured: float | None) -> float:
        if measured is None or math.isnan(measured):
            return self.default_rtt
        return min(measured, self.max_rtt)


def missing_blocks(spans: Collection[ServerSpan], start: int, end: int) -> list[int]:
    """Blocks in [start, end) that no span holds."""
    covered = [False] * (end - start)
    for span in spans:
        for block in range(max(span.start, start), min(span.end, end)):
            covered[block - start] = True
    return [start + i for i, ok in enumerate(covered) if not ok]


def usable_spans(
    spans: Collection[ServerSpan], banned: Collection[str], start: int, end: int
) -> list[ServerSpan]:
    """Spans of peers that are not banned; a block that only banned peers hold keeps its banned peers.

    Falling back to banned peers follows Petals: if every holder of a block failed, the fault may be ours
    (a network blip), and retrying them beats refusing outright.
    """
    allowed = [span for span in spans if span.peer_id not in banned]
    holes = set(missing_blocks(allowed, start, end)) - set(missing_blocks(spans, start, end))
    if holes:
        allowed += [
            span
            for span in spans
            if span.peer_id in banned and any(span.start <= block < span.end for block in holes)
        ]
    return allowed


def _node_key(node) -> tuple:
    # Deterministic ordering of graph nodes for tie-breaks: by block, then by peer id.
    if node == "start":
        return (-1, "")
    if node == "end":
        return (math.inf, "")
    peer_id, block = node
    return (block, peer_id)


def min_latency_route(
    spans: Collection[ServerSpan],
    start: int,
    end: int,
    *,
    client_rtts: Mapping[str, float] | None = None,
    banned: Collection[str] = (),
    cache_tokens_needed: int | None = None,
    model: LatencyModel = LatencyModel(),
) -> list[Hop]:
    """The route over blocks [start, end) with the least expected time per inference step.

    Graph nodes are (peer, block boundary); entering a server costs the client's round trip to it plus a
    fixed overhead (the client relays activations between servers), each block costs 1 / inference_rps.
    Switching servers only at the start or end of a span loses nothing (per-block costs are constant per
    server) and keeps the graph small. Ties are broken by peer id, so the result is deterministic.
    """
    if start >= end:
        return []
    client_rtts = client_rtts or {}
    candidates = usable_spans(spans, banned, start, end)
    holes = missing_blocks(candidates, start, end)
    if holes:
        raise MissingBlocksError(holes)
    candidates = sorted(
        (s for s in candidates if s.end > start and s.start < end), key=lambda s: (s.start, s.peer_id, s.end)
    )

    def entry_cost(span: ServerSpan) -> float:
        cost = model.rtt(client_rtts.get(span.peer_id)) + model.overhead
        # Pessimistic, as in Petals: assume we will use every block the server holds.
        if (
            cache_tokens_needed is not None
            and span.cache_tokens_left is not None
            and cache_tokens_needed * 2 * span.length > span.cache_tokens_left
        ):
            cost += model.alloc_penalty
        return cost

    def block_cost(span: ServerSpan) -> float:
        rps = span.inference_rps if span.inference_rps and span.inference_rps > 0 else None
        return 1.0 / (rps or model.default_inference_rps)

    by_peer = {}
    for span in candidates:
        by_peer.setdefault(span.peer_id, []).append(span)

    # Adjacency built lazily from the node: (peer, b) may advance one block on the same span, or hop to
    # another span that holds block b, when b is the end of the current span or the start of the next one.
    def edges(node):
        if node == "start":
            for span in candidates:
                if span.start <= start < span.end:
                    yield (span.peer_id, start), entry_cost(span), span
            return
        peer_id, block = node
        if block == end:
            yield "end", 0.0, None
            return
        here = [s for s in by_peer[peer_id] if s.start <= block < s.end]
        for span in here:
            yield (peer_id, block + 1), block_cost(span), span
        ends_here = any(s.end == block for s in by_peer[peer_id]) or not here
        for span in candidates:
            if (
                span.peer_id != peer_id
                and span.start <= block < span.end
                and (ends_here or span.start == block)
            ):
                yield (span.peer_id, block), entry_cost(span), span

    dist = {"start": 0.0}
    prev: dict = {}
    heap = [(0.0, _node_key("start"), "start")]
    done = set()
    while heap:
        cost, _, node = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        if node == "end":
            break
        for nxt, weight, _span in edges(node):
            new_cost = cost + weight
            old = dist.get(nxt)
            if old is None or new_cost < old - 1e-12:  # strict: the first-found path wins ties
                dist[nxt] = new_cost
                prev[nxt] = node
                heapq.heappush(heap, (new_cost, _node_key(nxt), nxt))
    if "end" not in done:  # cannot happen once coverage is checked, kept as a guard
        raise MissingBlocksError(missing_blocks(candidates, start, end))

    path = []
    node = prev["end"]
    while node != "start":
        path.append(node)
        node = prev[node]
    path.reverse()
    return _path_to_hops(path)


def _path_to_hops(path: list[tuple[str, int]]) -> list[Hop]:
    hops: list[Hop] = []
    for (peer_id, block), (next_peer, next_block) in itertools.pairwise(path):
        if next_peer != peer_id or next_block == block:
            continue  # a hop between servers at the same boundary
        if hops and hops[-1].peer_id == peer_id and hops[-1].end == block:
            hops[-1] = Hop(peer_id, hops[-1].start, next_block)
        else:
            hops.append(Hop(peer_id, block, next_block))
    return hops


def max_throughput_route(
    spans: Collection[ServerSpan],
    start: int,
    end: int,
    *,
    banned: Collection[str] = (),
    unreachable: Collection[str] = (),
    rng: random.Random | None = None,
) -> list[Hop]:
    """A route over blocks [start, end) for batch work (forward/backward): few hops on fast servers.

    At each uncovered block, a span holding it is chosen with weight (blocks it covers from here) x
    throughput, so long spans on fast servers are preferred while load spreads over the swarm. With no
    `rng`, the heaviest span wins (ties by peer id): deterministic. Unreachable peers get a tiny weight.
    """
    if start >= end:
        return []
    candidates = usable_spans(spans, banned, start, end)
    holes = missing_blocks(candidates, start, end)
    if holes:
        raise MissingBlocksError(holes)

    hops: list[Hop] = []
    block = start
    while block < end:
        options = sorted(
            (s for s in candidates if s.start <= block < s.end), key=lambda s: (s.peer_id, s.start)
        )
        weights = []
        for span in options:
            covered = min(span.end, end) - block
            speed = span.throughput if span.throughput and span.throughput > 0 else 1.0
            weights.append(covered * speed * (1e-6 if span.peer_id in unreachable else 1.0))
        if rng is None:
            best = max(range(len(options)), key=lambda i: (weights[i], -i))
        else:
            best = rng.choices(range(len(options)), weights=weights)[0]
        chosen = options[best]
        hops.append(Hop(chosen.peer_id, block, min(chosen.end, end)))
        block = min(chosen.end, end)
    return hops


def route_latency(
    hops: Sequence[Hop],
    spans: Collection[ServerSpan],
    *,
    client_rtts: Mapping[str, float] | None = None,
    model: LatencyModel = LatencyModel(),
) -> float:
    """Expected seconds per inference step along `hops` under the same model as `min_latency_route`."""
    client_rtts = client_rtts or {}
    total = 0.0
    for hop in hops:
        span = next(
            s for s in spans if s.peer_id == hop.peer_id and s.start <= hop.start and hop.end <= s.end
        )
        rps = (
            span.inference_rps
            if span.inference_rps and span.inference_rps > 0
            else model.default_inference_rps
        )
        total += model.rtt(client_rtts.get(hop.peer_id)) + model.overhead + hop.length / rps
    return total


def _format_ranges(blocks: Sequence[int]) -> str:
    parts, i = [], 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        parts.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ", ".join(parts)
