"""Rebalancing and live resize: a server that moves to the blocks the swarm needs most, without a restart.

While serving, the `Rebalancer` re-reads the swarm every `period` seconds (jittered, so a swarm of servers
does not move at once) and asks `should_rebalance` (Petals' rule: move when the swarm's weakest block would
get faster by more than 1/balance_quality). Before moving it waits a random moment and asks again: another
server may just be moving. A move reuses the host's drain (engine/server/drain.py): announce OFFLINE, let
sessions finish or fail over, free the span; then a new BlockHost on the same DHT peer (same peer id) loads
only the tensors of its new span and announces it. `resize(num_blocks)` takes the same path with another
span length (the user's memory share changed).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from engine.server.block_host import BlockHost, start_server_dht
from engine.server.config import ServerConfig
from engine.server.drain import DrainMode
from engine.swarm.block_selection import choose_best_blocks, should_rebalance
from engine.swarm.discovery import fetch_snapshot
from engine.swarm.records import ServerState
from engine.swarm.snapshot import SwarmSnapshot

logger = logging.getLogger(__name__)


def jittered(period: float, rng: random.Random) -> float:
    """A wait of `period` seconds on average, anywhere in [period / 2, 3 * period / 2]."""
    return period * rng.uniform(0.5, 1.5)


def best_span_without(peer_id: str, snapshot: SwarmSnapshot, num_blocks: int) -> tuple[int, int]:
    """Where `num_blocks` blocks help most once this server's own contribution is taken out of the swarm."""
    throughputs = snapshot.block_throughputs(ServerState.JOINING)
    own = snapshot.spans_by_peer(ServerState.JOINING).get(peer_id)
    if own is not None:
        for index in range(own.start, own.end):
            throughputs[index] -= own.throughput
    return choose_best_blocks(num_blocks, throughputs)


class Rebalancer:
    """Owns a server's DHT peer and its current BlockHost; moves or resizes the span while serving.

    `period <= 0` never moves on its own (resize still works). `make_host(config, dht)` builds a host
    (tests and the engine service pass their hooks through it).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        period: float = 120.0,
        balance_quality: float = 0.75,
        grace_seconds: float = 30.0,
        make_host: Callable[[ServerConfig, object], BlockHost] | None = None,
        seed: int | None = None,
    ):
        self.config = config
        self.period = period
        self.balance_quality = balance_quality
        self.grace_seconds = grace_seconds
        self._make_host = make_host or (lambda cfg, dht: BlockHost(cfg, dht=dht))
        self._rng = random.Random(seed)
        self.dht = None
        self.host: BlockHost | None = None
        self.moves = 0
        self._lock = threading.RLock()  # one move at a time (the loop, resize and stop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BlockHost:
        """Join the swarm, start the first host (its span chosen as usual) and the rebalancing loop."""
        self.dht = start_server_dht(self.config)
        try:
            host = self._make_host(self.config, self.dht)
            host.start()
        except BaseException:
            self.dht.shutdown()
            raise
        self.host = host
        if self.period > 0:
            self._thread = threading.Thread(target=self._loop, name="pollinate-rebalance", daemon=True)
            self._thread.start()
        return host

    def info(self):
        """The current host's HostInfo (during a move: the host being started)."""
        with self._lock:
            return self.host.info()

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def _snapshot(self) -> SwarmSnapshot:
        info = self.host.info()
        return fetch_snapshot(self.dht, info.dht_prefix, info.total_blocks)

    def _loop(self) -> None:
        while not self._stop.wait(jittered(self.period, self._rng)):
            try:
                self.check_once()
            except Exception:
                logger.warning("rebalancing check failed", exc_info=True)

    def check_once(self) -> bool:
        """One round: move if the swarm would be faster with us elsewhere (asked twice); True if moved."""
        with self._lock:
            if self.host is None or self._stop.is_set():
                return False
            if not should_rebalance(self.peer_id, self._snapshot(), self.balance_quality):
                return False
        # Another server may be moving right now: ask again after a random moment.
        if self._stop.wait(self._rng.uniform(0.0, self.period / 2)):
            return False
        with self._lock:
            if self.host is None or self._stop.is_set():
                return False
            snapshot = self._snapshot()
            if not should_rebalance(self.peer_id, snapshot, self.balance_quality):
                return False
            info = self.host.info()
            start, end = best_span_without(self.peer_id, snapshot, info.end_block - info.start_block)
            logger.info("the swarm is imbalanced: moving from blocks %d:%d to %d:%d", info.start_block,
                        info.end_block, start, end)  # fmt: skip
            self._move_to(start, end)
            return True

    def resize(self, num_blocks: int) -> tuple[int, int]:
        """Serve `num_blocks` blocks instead, where the swarm needs them (via a drain); returns the span."""
        with self._lock:
            info = self.host.info()
            if not 1 <= num_blocks <= info.total_blocks:
                raise ValueError(f"num_blocks must be in 1..{info.total_blocks}, got {num_blocks}")
            if num_blocks == info.end_block - info.start_block:
                return info.start_block, info.end_block
            start, end = best_span_without(self.peer_id, self._snapshot(), num_blocks)
            logger.info("resizing from blocks %d:%d to %d:%d", info.start_block, info.end_block, start, end)
            self._move_to(start, end)
            return start, end

    def _move_to(self, start: int, end: int) -> None:
        old, self.host = self.host, None
        old.drain(self.grace_seconds, DrainMode.RELEASE)
        config = self.config.replace(start_block=start, end_block=end, num_blocks=None)
        host = self._make_host(config, self.dht)
        host.start()  # on failure the exception reaches the caller; the next round plans again
        self.host = host
        self.moves += 1

    def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop moving, drain the current host and leave the swarm."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            host, self.host = self.host, None
            if host is not None:
                host.stop(grace_seconds)
            if self.dht is not None:
                self.dht.shutdown()
                self.dht = None
