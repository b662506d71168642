"""An immutable view of one model's swarm at one moment: who serves which block, and derived spans.

Pure data (no DHT access), so routing and block selection can be tested on synthetic swarms.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from engine.swarm.records import RemoteSpanInfo, ServerInfo, ServerState


@dataclasses.dataclass(frozen=True)
class SwarmSnapshot:
    """Servers announcing each block ``0..num_blocks-1`` of the model under ``dht_prefix``.

    ``blocks[i]`` maps peer id (base58 string) to the ServerInfo that peer announced for block i.
    """

    dht_prefix: str
    blocks: Sequence[Mapping[str, ServerInfo]]
    fetched_at: float = dataclasses.field(default_factory=time.time, compare=False)

    def __post_init__(self) -> None:
        frozen = tuple(MappingProxyType(dict(servers)) for servers in self.blocks)
        object.__setattr__(self, "blocks", frozen)

    @classmethod
    def from_servers(
        cls, dht_prefix: str, num_blocks: int, servers: Mapping[str, ServerInfo]
    ) -> SwarmSnapshot:
        """A synthetic snapshot: each server appears on blocks ``[start_block, end_block)`` of its record."""
        blocks: list[dict[str, ServerInfo]] = [{} for _ in range(num_blocks)]
        for peer_id, info in servers.items():
            if info.start_block is None or info.end_block is None:
                raise ValueError(f"server {peer_id} needs start_block and end_block")
            for index in range(info.start_block, min(info.end_block, num_blocks)):
                blocks[index][peer_id] = info
        return cls(dht_prefix=dht_prefix, blocks=blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def spans(self, min_state: ServerState = ServerState.ONLINE) -> list[RemoteSpanInfo]:
        """One span per server in state ``min_state`` or better, ordered by (start, peer id).

        Follows Petals' compute_spans: a server's best state wins; a record that names its own
        start_block/end_block is trusted for the span bounds (clipped to the model), otherwise consecutive
        blocks announced in the same state extend the span.
        """
        bounds: dict[str, tuple[int, int, ServerInfo]] = {}
        for index, servers in enumerate(self.blocks):
            for peer_id in sorted(servers):
                info = servers[peer_id]
                if info.state < min_state:
                    continue
                known = bounds.get(peer_id)
                if known is None or known[2].state < info.state:
                    start, end = index, index + 1
                    if info.start_block is not None and info.end_block is not None:
                        start, end = max(info.start_block, 0), min(info.end_block, self.num_blocks)
                    bounds[peer_id] = (start, end, info)
                elif known[2].state == info.state:
                    bounds[peer_id] = (known[0], max(known[1], index + 1), known[2])
        # A record claiming bounds outside the model leaves nothing to route through: drop it.
        spans = [RemoteSpanInfo(peer, s, e, info) for peer, (s, e, info) in bounds.items() if s < e]
        return sorted(spans, key=lambda span: (span.start, span.peer_id))

    def spans_by_peer(self, min_state: ServerState = ServerState.ONLINE) -> dict[str, RemoteSpanInfo]:
        """The same spans, keyed by peer id."""
        return {span.peer_id: span for span in self.spans(min_state)}

    def coverage(self, min_state: ServerState = ServerState.ONLINE) -> tuple[int, ...]:
        """How many servers in ``min_state`` or better announce each block."""
        return tuple(sum(info.state >= min_state for info in servers.values()) for servers in self.blocks)

    def missing_blocks(self, min_state: ServerState = ServerState.ONLINE) -> list[int]:
        """Blocks no server (in ``min_state`` or better) announces: the model cannot run without them."""
        return [index for index, count in enumerate(self.coverage(min_state)) if count == 0]

    def is_complete(self, min_state: ServerState = ServerState.ONLINE) -> bool:
        """True if every block has at least one server."""
        return self.num_blocks > 0 and not self.missing_blocks(min_state)

    def block_throughputs(self, min_state: ServerState = ServerState.JOINING) -> list[float]:
        """Total announced throughput per block, summed over spans (as Petals' block selection sees it)."""
        totals = [0.0] * self.num_blocks
        # Summed in peer-id order so the same swarm always gives the same floats (no spurious rebalancing).
        for span in sorted(self.spans(min_state), key=lambda span: span.peer_id):
            for index in range(span.start, span.end):
                totals[index] += span.throughput
        return totals
