"""A health view of the swarm, like health.petals.dev: per model its coverage, per server what it announces.

Pure functions over snapshots (no DHT access) build the view; `read_swarm_health` is the thin I/O shell.
Records of Petals servers and of Pollinate servers are read the same way (the Petals 2.x schema).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from engine.swarm.records import ModelInfo, RemoteSpanInfo, ServerInfo, ServerState
from engine.swarm.snapshot import SwarmSnapshot

REACHABILITY_LABELS = ("direct", "relayed", "unreachable", "unknown")


def server_reachability(info: ServerInfo) -> str:
    """How clients reach a server, from its own record: directly, through a libp2p relay, not at all, or
    not said. Pollinate servers announce their dial-back check; Petals servers set `using_relay` when
    nobody could dial them and they took a relay."""
    if info.reachability is not None and info.reachability != "unknown":
        return "direct" if info.reachability == "reachable" else info.reachability
    if info.using_relay is None:
        return "unknown"
    return "relayed" if info.using_relay else "direct"


@dataclasses.dataclass(frozen=True)
class ServerHealth:
    """One server of one model, as the health view shows it."""

    peer_id: str
    public_name: str | None
    version: str | None
    state: str  # "offline" / "joining" / "online"
    start_block: int
    end_block: int
    throughput: float
    inference_rps: float | None
    cache_tokens_left: int | None
    torch_dtype: str | None
    quant_type: str | None
    reachability: str
    points: float | None  # what the server announces it earned (Pollinate's extension)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelHealth:
    """One model: how many online servers hold each block, and the servers themselves."""

    dht_prefix: str
    repository: str | None
    num_blocks: int
    coverage: tuple[int, ...]  # online servers per block
    servers: tuple[ServerHealth, ...]

    @property
    def missing_blocks(self) -> list[int]:
        return [index for index, count in enumerate(self.coverage) if count == 0]

    @property
    def complete(self) -> bool:
        return self.num_blocks > 0 and not self.missing_blocks

    @property
    def covered_blocks(self) -> int:
        return sum(count > 0 for count in self.coverage)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            dht_prefix=self.dht_prefix,
            repository=self.repository,
            num_blocks=self.num_blocks,
            coverage=list(self.coverage),
            covered_blocks=self.covered_blocks,
            missing_blocks=self.missing_blocks,
            complete=self.complete,
            servers=[server.to_dict() for server in self.servers],
        )


def server_health(span: RemoteSpanInfo) -> ServerHealth:
    """The row of one server span."""
    info = span.server_info
    return ServerHealth(
        peer_id=span.peer_id,
        public_name=info.public_name,
        version=info.version,
        state=ServerState(info.state).name.lower(),
        start_block=span.start,
        end_block=span.end,
        throughput=float(info.throughput),
        inference_rps=info.inference_rps,
        cache_tokens_left=info.cache_tokens_left,
        torch_dtype=info.torch_dtype,
        quant_type=info.quant_type,
        reachability=server_reachability(info),
        points=info.points,
    )


def model_health(snapshot: SwarmSnapshot, repository: str | None = None) -> ModelHealth:
    """The health of one model from a snapshot of its blocks; servers sorted by first block, then id."""
    spans = snapshot.spans(ServerState.OFFLINE)  # offline servers still show, as on health.petals.dev
    return ModelHealth(
        dht_prefix=snapshot.dht_prefix,
        repository=repository,
        num_blocks=snapshot.num_blocks,
        coverage=snapshot.coverage(ServerState.ONLINE),
        servers=tuple(server_health(span) for span in spans),
    )


def read_swarm_health(
    models: Mapping[str, ModelInfo],
    fetch: Callable[[str, int], SwarmSnapshot],
    *,
    only: str | None = None,
) -> list[ModelHealth]:
    """Health of every model in the index (or only the one whose prefix or repository is `only`).

    `fetch(dht_prefix, num_blocks)` reads one model's snapshot (discovery.fetch_snapshot with a DHT bound).
    Raises LookupError when `only` names no model of the index.
    """
    chosen = {prefix: info for prefix, info in models.items() if only is None or matches(only, prefix, info)}
    if only is not None and not chosen:
        known = ", ".join(sorted(models)) or "none"
        raise LookupError(f"the swarm announces no model {only!r}; models in its index: {known}")
    return [
        model_health(fetch(prefix, info.num_blocks), info.repository)
        for prefix, info in sorted(chosen.items())
    ]


def matches(name: str, prefix: str, info: ModelInfo) -> bool:
    """Whether `name` (a DHT prefix, a repository URL or an owner/name id) names this index entry."""
    if name == prefix:
        return True
    if not info.repository:
        return False
    repository = info.repository.removeprefix("https://huggingface.co/").strip("/")
    return name.strip("/") in (info.repository, repository)
