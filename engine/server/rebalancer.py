"""Rebalancing and live resize: a server that moves to the blocks the swarm needs most, without a restart.

While serving, the `Rebalancer` re-reads the swarm every `period` seconds (jittered, so a swarm of servers
does not move at once) and asks `should_rebalance` (Petals' rule: move when the swarm's weakest block would
get faster by more than 1/balance_quality). Before moving it waits a random moment and asks again: another
server may just be moving. A move reuses the host's drain (engine/server/drain.py): announce OFFLINE, let
sessions finish or fail over, free the span; then a new BlockHost on the same DHT peer (same peer id) loads
only the tensors of its new span and announces it. `resize(num_blocks)` takes the same path with another
span length (the user's memory share changed). A paused host (drained with HOLD) is never moved.

The owner hears of every move through `MoveHooks` (the engine service puts them in its status, vetoes moves
while it pauses or stops, and asks for live resizes when free memory changes); `serve` uses the defaults.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from contract import MoveReason
from engine.server.block_host import MOVING_MESSAGE, BlockHost, HostState, start_server_dht
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


def memory_resize_target(current: int, wanted: int | None, wanted_before: int | None) -> int | None:
    """The span length to resize to when free memory changed, or None to stay.

    Only when two checks in a row want the same other length: memory use of other programs comes and goes,
    and every move costs a drain and a reload.
    """
    if wanted is None or wanted == current or wanted != wanted_before:
        return None
    return wanted


class MoveHooks:
    """What the owner of a Rebalancer is told and asked about moves. The defaults allow every move."""

    def may_move(self) -> bool:
        """False while the owner does not want the span touched (paused, stopping)."""
        return True

    def wanted_blocks(self, current: int) -> int | None:
        """Asked every round: a span length to resize to now (free memory changed), or None."""
        return None

    def move_starting(self, old: BlockHost, span: tuple[int, int], reason: MoveReason) -> bool:
        """Before the drain; False cancels the move (nothing has changed yet)."""
        return True

    def old_drained(self, old: BlockHost) -> bool:
        """The old span is drained and freed; False: do not load the new one (the owner stops us)."""
        return True

    def move_done(self, host: BlockHost | None, error: Exception | None) -> None:
        """The new host serves (`host`), or starting it failed (`error`; the Rebalancer has no host then)."""


class Rebalancer:
    """Owns a server's DHT peer and its current BlockHost; moves or resizes the span while serving.

    `period <= 0` never moves on its own (resize still works). `make_host(config, dht)` builds a host
    (tests and the engine service pass their hooks through it); `hooks` (MoveHooks) hears of every move.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        period: float = 120.0,
        balance_quality: float = 0.75,
        grace_seconds: float = 30.0,
        make_host: Callable[[ServerConfig, object], BlockHost] | None = None,
        hooks: MoveHooks | None = None,
        seed: int | None = None,
    ):
        self.config = config
        self.period = period
        self.balance_quality = balance_quality
        self.grace_seconds = grace_seconds
        self._make_host = make_host or (lambda cfg, dht: BlockHost(cfg, dht=dht))
        self.hooks = hooks or MoveHooks()
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
            host = self.host = self._make_host(self.config, self.dht)  # stop() can reach it while it loads
            host.start()
        except BaseException:
            self.host = None
            self.dht.shutdown()
            raise
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

    def _may_move(self) -> bool:
        # Called with the lock held. A host that is paused, loading or draining stays where it is.
        host = self.host
        if host is None or self._stop.is_set() or host.state != HostState.SERVING:
            return False
        return self.hooks.may_move()

    def check_once(self) -> bool:
        """One round: resize if free memory changed, else move if the swarm would be faster with us
        elsewhere (asked twice); True if moved."""
        with self._lock:
            if not self._may_move():
                return False
            info = self.host.info()
            current = info.end_block - info.start_block
            wanted = self.hooks.wanted_blocks(current)
            if wanted is not None and wanted != current:
                self._resize_locked(wanted, MoveReason.MEMORY)
                return True
            if not should_rebalance(self.peer_id, self._snapshot(), self.balance_quality):
                return False
        # Another server may be moving right now: ask again after a random moment.
        if self._stop.wait(self._rng.uniform(0.0, self.period / 2)):
            return False
        with self._lock:
            if not self._may_move():
                return False
            snapshot = self._snapshot()
            if not should_rebalance(self.peer_id, snapshot, self.balance_quality):
                return False
            info = self.host.info()
            start, end = best_span_without(self.peer_id, snapshot, info.end_block - info.start_block)
            logger.info("the swarm is imbalanced: moving from blocks %d:%d to %d:%d", info.start_block,
                        info.end_block, start, end)  # fmt: skip
            return self._move_to(start, end, MoveReason.REBALANCE)

    def resize(self, num_blocks: int, reason: MoveReason = MoveReason.SHARE) -> tuple[int, int]:
        """Serve `num_blocks` blocks instead, where the swarm needs them (via a drain); returns the span
        served afterwards (the old one if the owner's hooks cancelled the move)."""
        with self._lock:
            if self.host is None:
                raise RuntimeError("nothing is served: the server stopped or its last move failed")
            return self._resize_locked(num_blocks, reason)

    def _resize_locked(self, num_blocks: int, reason: MoveReason) -> tuple[int, int]:
        info = self.host.info()
        if not 1 <= num_blocks <= info.total_blocks:
            raise ValueError(f"num_blocks must be in 1..{info.total_blocks}, got {num_blocks}")
        if num_blocks == info.end_block - info.start_block:
            return info.start_block, info.end_block
        start, end = best_span_without(self.peer_id, self._snapshot(), num_blocks)
        logger.info("resizing (%s) from blocks %d:%d to %d:%d", reason, info.start_block, info.end_block,
                    start, end)  # fmt: skip
        if not self._move_to(start, end, reason):
            return info.start_block, info.end_block
        return start, end

    def _move_to(self, start: int, end: int, reason: MoveReason) -> bool:
        # Called with the lock held: one move at a time.
        old = self.host
        if not self.hooks.move_starting(old, (start, end), reason):
            return False
        old.drain(self.grace_seconds, DrainMode.RELEASE, reason=MOVING_MESSAGE)
        self.host = None
        if not self.hooks.old_drained(old):
            return False
        config = self.config.replace(start_block=start, end_block=end, num_blocks=None)
        try:
            host = self.host = self._make_host(config, self.dht)
            host.start()
        except Exception as error:  # the exception reaches the caller too; the next round plans again
            self.host = None
            self.hooks.move_done(None, error)
            raise
        self.moves += 1
        self.hooks.move_done(host, None)
        return True

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
