"""A live view of one model's swarm for a client: who holds which blocks, routes, rpc_info, bans.

The view is a `SwarmSnapshot` read from the DHT, refreshed in a background thread every `update_period`
seconds and on demand when it is older than `max_age` or when a failure leaves a block uncovered. Route
choice itself is the pure `engine.client.routing`; failures are reported here and turn into bans.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P
from hivemind.utils.logging import get_logger

from engine.client import protocol
from engine.client.bans import BanList, RetryPolicy
from engine.client.routing import (
    Hop,
    MissingBlocksError,
    ServerSpan,
    max_throughput_route,
    min_latency_route,
)
from engine.swarm.discovery import fetch_snapshot
from engine.swarm.keys import block_uids
from engine.swarm.records import RemoteSpanInfo
from engine.swarm.snapshot import SwarmSnapshot

logger = get_logger(__name__)

RouteMode = Literal["min_latency", "max_throughput"]

# Called after each successful reply with (peer_id in base58, tokens = batch x input tokens, blocks, seconds):
# how the contribution ledger learns what other peers' servers computed for this node.
UsageObserver = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class ClientConfig:
    """How the client talks to the swarm; the defaults suit a public swarm."""

    connect_timeout: float = 5.0  # opening a stream to a server
    request_timeout: float = 180.0  # one forward/backward/inference step
    update_period: float = 60.0  # background refresh of the swarm view
    read_timeout: float = 30.0  # one read of the swarm view from the DHT (a stalled DHT peer fails it)
    max_age: float = 30.0  # a route is never chosen from a view older than this
    points: float = 0.0  # points offered per request (Petals' spending policy; 0 = none)
    active_adapter: str | None = None  # LoRA adapter name the servers should apply (None: none)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    show_route: bool = False  # log each inference route at INFO
    server_to_server: bool = True  # ask each server to push its outputs to the next one (Petals' mode)
    # ... but only to a server at least this far from us (round trip): nearby, a push saves nothing and
    # costs the servers an extra call (on loopback it made decode steps slower).
    push_min_rtt: float = 0.010


class SequenceManager:
    """Keeps the swarm view of blocks [0, num_blocks) of the model under `dht_prefix` and picks routes.

    Thread-safe. `start()` connects to the DHT's p2p daemon and starts the refresh thread; `close()` stops it.
    `usage_observer` (e.g. `Ledger.record_consumed`) hears of every successful reply (see `report_usage`).
    """

    def __init__(
        self,
        dht: DHT,
        dht_prefix: str,
        num_blocks: int,
        config: ClientConfig | None = None,
        *,
        usage_observer: UsageObserver | None = None,
    ):
        self.dht = dht
        self.dht_prefix = dht_prefix
        self.num_blocks = num_blocks
        self.config = config or ClientConfig()
        self.usage_observer = usage_observer
        self.block_uids: tuple[str, ...] = tuple(block_uids(dht_prefix, 0, num_blocks))
        self.bans = BanList.from_policy(self.config.retry)
        self._p2p: P2P | None = None
        self._snapshot: SwarmSnapshot | None = None
        self._snapshot_time = -float("inf")
        self._lock = threading.Lock()  # guards the snapshot and the caches below
        self._update_lock = threading.Lock()  # one DHT read at a time
        self._rpc_infos: dict[str, dict] = {}
        self._rtts: dict[str, float] = {}
        self._network_rtts: dict[str, float] = {}  # rpc_info round trips: the network alone
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

    # lifecycle

    def start(self) -> SequenceManager:
        if self._p2p is None:
            self._p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh_loop, name="swarm-view", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def close_p2p(self) -> None:
        """Close our connection to the p2p daemon (only when no one else in this process uses the DHT)."""
        p2p, self._p2p = self._p2p, None
        if p2p is not None:
            try:
                RemoteExpertWorker.run_coroutine(p2p.shutdown())
            except Exception as e:
                logger.debug(f"Closing the p2p replica failed: {e!r}")

    def __enter__(self) -> SequenceManager:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def p2p(self) -> P2P:
        if self._p2p is None:
            self.start()
        return self._p2p

    # the swarm view

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.update()
            except Exception as e:  # a DHT hiccup must not kill the thread; the next round retries
                logger.debug(f"Swarm view refresh failed: {e!r}")
            self._wake.wait(self.config.update_period)
            self._wake.clear()

    def update(self) -> SwarmSnapshot:
        """Read the swarm from the DHT now (waits for a read already running instead of starting another)."""
        started = time.monotonic()
        with self._update_lock:
            with self._lock:
                if self._snapshot is not None and self._snapshot_time >= started:
                    return self._snapshot  # someone refreshed while we waited
            snapshot = fetch_snapshot(self.dht, self.dht_prefix, self.num_blocks, self.config.read_timeout)
            with self._lock:
                self._snapshot, self._snapshot_time = snapshot, time.monotonic()
            return snapshot

    def snapshot(self, max_age: float | None = None) -> SwarmSnapshot:
        """The latest view, refreshed first if it is older than `max_age` (default: config.max_age)."""
        max_age = self.config.max_age if max_age is None else max_age
        with self._lock:
            snapshot, fetched = self._snapshot, self._snapshot_time
        if snapshot is None or time.monotonic() - fetched > max_age:
            snapshot = self.update()
        return snapshot

    def spans(self, max_age: float | None = None) -> list[RemoteSpanInfo]:
        return self.snapshot(max_age).spans()

    def _server_spans(self, snapshot: SwarmSnapshot) -> list[ServerSpan]:
        return [
            ServerSpan(
                peer_id=span.peer_id,
                start=span.start,
                end=span.end,
                inference_rps=span.server_info.inference_rps,
                throughput=span.server_info.forward_rps or span.server_info.throughput,
                cache_tokens_left=span.server_info.cache_tokens_left,
                next_pings=span.server_info.next_pings or {},
            )
            for span in snapshot.spans()
        ]

    # routes

    def make_sequence(
        self,
        start: int = 0,
        end: int | None = None,
        *,
        mode: RouteMode = "min_latency",
        cache_tokens_needed: int | None = None,
    ) -> list[Hop]:
        """A route over blocks [start, end) avoiding banned peers; MissingBlocksError if none exists."""
        end = self.num_blocks if end is None else end
        if not 0 <= start <= end <= self.num_blocks:
            raise ValueError(f"invalid block range [{start}, {end}) for a model of {self.num_blocks} blocks")
        for fresh in (False, True):
            snapshot = self.update() if fresh else self.snapshot()
            spans = self._server_spans(snapshot)
            try:
                if mode == "min_latency":
                    route = min_latency_route(
                        spans,
                        start,
                        end,
                        client_rtts=self.rtts(),
                        banned=self.bans.banned(),
                        cache_tokens_needed=cache_tokens_needed,
                    )
                elif mode == "max_throughput":
                    route = max_throughput_route(spans, start, end, banned=self.bans.banned(), rng=self._rng)
                else:
                    raise ValueError(f"unknown route mode {mode!r}")
            except MissingBlocksError as e:
                if fresh:
                    raise MissingBlocksError(e.missing_blocks, num_blocks=self.num_blocks) from None
                continue  # the view may be stale: read the DHT once more before giving up
            if self.config.show_route:
                logger.info(
                    "Route: " + " => ".join(f"{h.start}:{h.end} via …{h.peer_id[-6:]}" for h in route)
                )
            return route
        raise AssertionError("unreachable")

    def uids(self, start: int, end: int) -> list[str]:
        return list(self.block_uids[start:end])

    # per-server facts

    def rpc_info(self, peer_id: str, block_index: int = 0) -> dict:
        """The server's rpc_info (schemas, version), fetched once per server and cached."""
        with self._lock:
            info = self._rpc_infos.get(peer_id)
        if info is not None:
            return info
        started = time.perf_counter()
        info = RemoteExpertWorker.run_coroutine(
            protocol.fetch_rpc_info(
                self.p2p, peer_id, self.block_uids[block_index], timeout=self.config.connect_timeout
            )
        )
        elapsed = time.perf_counter() - started
        with self._lock:
            self._rpc_infos[peer_id] = info
            self._rtts.setdefault(peer_id, elapsed)
            self._network_rtts[peer_id] = elapsed
        return info

    def network_rtt(self, peer_id: str) -> float | None:
        """The round trip of our rpc_info call to `peer_id` (no compute in it), None before the first."""
        with self._lock:
            return self._network_rtts.get(peer_id)

    def observe_rtt(self, peer_id: str, seconds: float) -> None:
        """Record a measured round trip to `peer_id` (smoothed), used by min-latency routing."""
        with self._lock:
            old = self._rtts.get(peer_id)
            self._rtts[peer_id] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def rtts(self) -> dict[str, float]:
        with self._lock:
            return dict(self._rtts)

    def request_metadata(self) -> dict:
        """The metadata fields every request carries (Petals: points, active_adapter)."""
        return dict(points=self.config.points, active_adapter=self.config.active_adapter)

    def report_usage(self, hop: Hop, tokens: int, seconds: float) -> None:
        """Tell the usage observer that `hop`'s server computed `tokens` through its blocks; never raises."""
        observer = self.usage_observer
        if observer is None:
            return
        try:
            observer(hop.peer_id, tokens, hop.end - hop.start, seconds)
        except Exception as e:  # bookkeeping must never break generation
            logger.debug(f"Usage observer failed for {hop.peer_id}: {e!r}")

    # failures

    def on_request_success(self, peer_id: str) -> None:
        self.bans.register_success(peer_id)

    def on_request_failure(self, peer_id: str | None) -> None:
        """Ban `peer_id` (with backoff) and forget what we cached about it; refresh the view soon."""
        if peer_id is not None:
            duration = self.bans.register_failure(peer_id)
            logger.debug(f"Peer {peer_id} failed, banned for {duration:.0f} s")
            with self._lock:
                self._rpc_infos.pop(peer_id, None)
        self._wake.set()

    def retry_delay(self, attempt_no: int) -> float:
        return self.config.retry.delay(attempt_no)

    def gives_up(self, attempt_no: int) -> bool:
        return self.config.retry.gives_up(attempt_no)

    def missing_blocks(self) -> Sequence[int]:
        return self.snapshot().missing_blocks()
