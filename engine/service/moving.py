"""Moving: the user's hosting follows the swarm and the memory it may use, without a restart.

The move half of the Hosting part (engine/service/hosting.py), whose state it shares. Every hosting runs its
BlockHost under a Rebalancer (engine/server/rebalancer.py) that owns the hosting's DHT peer, so a move keeps
the peer id. With blocks "auto" or a count it re-reads the swarm every jittered period and moves by Petals'
rule; with "auto" it also resizes the span when free memory changed (two checks in a row agree), and at
once when the user changes the memory share (/api/hosting/resize). A fixed span "A:B" never moves.

A move drains the old span (clients read "moving to other blocks" and fail over), frees it, loads the new
one and serves; meanwhile the status says so (`status["move"]`, state draining then loading). A paused,
loading or stopping host is never moved; a pause that frees the weights ends the Rebalancer, and resuming
plans the span afresh (a resume that held the weights runs one rebalancing round at once). A stop during
a move ends it after the drain (or after the load).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from contract import MOVE_WORDS, HostingState, LoadPhase, Move, MoveReason
from engine.server.rebalancer import MoveHooks, Rebalancer, memory_resize_target
from engine.service.errors import InvalidRequestError, WrongStateError

logger = logging.getLogger(__name__)

SPAN_AUTO, SPAN_COUNT, SPAN_FIXED = "auto", "count", "fixed"  # how the request chose the span


def span_mode(blocks: str | None) -> str:
    """How a request chose its span: "auto" (also None), "count" ("4") or "fixed" ("A:B")."""
    if not blocks or blocks == "auto":
        return SPAN_AUTO
    return SPAN_FIXED if ":" in blocks else SPAN_COUNT


@dataclass(frozen=True)
class Sizing:
    """What sizing the span for a memory budget needs (kept from the plan of the running hosting)."""

    config: Any  # ServerConfig without a span or count
    model_config: Any
    dtype: Any
    quant: str
    device: Any


class MoveMixin(MoveHooks):
    """The Rebalancer's hooks and the memory share for the hosting state machine (mixed into Hosting only:
    it works on Hosting's own state)."""

    _server = None  # the Rebalancer of the running hosting (None when idle, or paused with weights freed)
    _span_mode = SPAN_FIXED
    _sizing: Sizing | None = None
    _wanted_before: int | None = None  # the last free-memory check's span length
    _share_pending = False  # the memory share changed while it could not be applied
    _moves = 0

    def _new_server(self, config, mode: str) -> Rebalancer:
        settings = self.core.config
        return Rebalancer(
            config,
            period=0.0 if mode == SPAN_FIXED else settings.rebalance_period,
            balance_quality=settings.balance_quality,
            grace_seconds=settings.move_grace_seconds,
            make_host=self._make_host,
            hooks=self,
        )

    def _make_host(self, config, dht):
        from engine.server.block_host import BlockHost

        host = BlockHost(config, dht=dht, on_progress=self._hosting_progress, **self.core.host_hooks())
        host.set_throttle(*self._throttle)
        with self.core.lock:
            self._host = host
        return host

    # ---- MoveHooks: called from the Rebalancer's thread, or from a resize's thread ---------------------

    def may_move(self) -> bool:
        record = self.core.status_record
        return (
            record.state == HostingState.SERVING
            and record.pause is None
            and record.move is None
            and not self._stop_requested
            and not self.core.closing.is_set()
        )

    def wanted_blocks(self, current: int) -> int | None:
        if self._span_mode != SPAN_AUTO:
            return None
        try:
            wanted = self._blocks_for_share(self._memory_share())
        except Exception as exc:  # e.g. not even one block fits now: keep serving what we have
            logger.info("free memory check: %s", exc)
            wanted = None
        target = memory_resize_target(current, wanted, self._wanted_before)
        self._wanted_before = wanted
        return target

    def move_starting(self, old, span: tuple[int, int], reason: MoveReason) -> bool:
        info = old.info()
        words = f"Moving to blocks {span[0]}:{span[1]} ({MOVE_WORDS[MoveReason(reason)]})"
        move = Move(
            reason=MoveReason(reason),
            message=words,
            from_blocks=[info.start_block, info.end_block],
            to_blocks=list(span),
            since=time.time(),
        )
        with self.core.lock:  # decided and marked at once: a pause or stop now sees "draining"
            if not self.may_move() or self._host is not old:
                return False
            self._end_sharing_stretch()
            self.core.status_record = self.core.status_record.replace(
                state=HostingState.DRAINING,
                progress=None,
                phase=None,
                message=f"{words}: letting running sessions finish",
                move=move,
            )
            status = self.core.status_record.to_dict()
        self.core.emit("status", status)
        self._stop_auditor()
        return True

    def old_drained(self, old) -> bool:
        from engine.service.hosting import _release_memory

        self._account_host(old)
        with self.core.lock:
            if self._host is old:
                self._host = None
            stop = self._stop_requested or self.core.closing.is_set()
            server, move = self._server, self.core.status_record.move
        del old
        _release_memory()
        if stop:  # stopped during the drain: do not load the new span
            if server is not None:
                self.core.spawn(lambda: self._drain(server, 0.0), "pollinate-draining")
            return False
        self.core.set_status(
            state=HostingState.LOADING,
            progress=0.0,
            phase=LoadPhase.PREPARING,
            message=LoadPhase.PREPARING.words,
            blocks=move.to_blocks if move is not None else None,
        )
        return True

    def move_done(self, host, error: Exception | None) -> None:
        if error is not None:
            logger.warning("moving the hosted span failed: %s", error)
            with self.core.lock:
                server, self._server = self._server, None
                self._host = None
            self.core.set_status(
                state=HostingState.ERROR,
                progress=None,
                phase=None,
                message=f"Hosting failed while moving to other blocks: {error}",
                blocks=None,
                move=None,
                reachability=None,
            )
            if server is not None:  # its DHT peer; not from this thread (it may be the Rebalancer's)
                self.core.spawn(server.stop, "pollinate-hosting-stop")
            return
        info = host.info()
        with self.core.lock:
            self._moves += 1
            stop_now, server = self._stop_requested, self._server
            if not stop_now:
                self._hosting_since = time.time()
        if stop_now:  # stop was asked for while the new span loaded
            if server is not None:
                self.core.spawn(lambda: self._drain(server, 0.0), "pollinate-draining")
            return
        self._start_auditor(host)
        self.core.spawn(lambda: self._report_reachability(host), "pollinate-reachability")
        self.core.set_status(
            state=HostingState.SERVING,
            progress=None,
            phase=None,
            message=None,
            move=None,
            blocks=[info.start_block, info.end_block],
        )
        self._apply_pending_share()

    def _rebalance_soon(self) -> None:
        """One rebalancing round now instead of at the next period (after a pause that held the weights)."""
        server = self._server
        if server is None or self._span_mode == SPAN_FIXED:
            return

        def check() -> None:
            try:
                server.check_once()
            except Exception:
                logger.warning("rebalancing check failed", exc_info=True)

        self.core.spawn(check, "pollinate-rebalance-now")

    # ---- the memory share -------------------------------------------------------------------------------

    def _memory_share(self) -> float | None:
        return (self._hosting_request or {}).get("memory_fraction")

    def _blocks_for_share(self, fraction: float | None) -> int:
        """How many blocks fit in `fraction` of the memory free now, counting what our host holds as free."""
        from engine.models.blocks import block_weight_bytes
        from engine.server import placement

        sizing, host = self._sizing, self._host
        if sizing is None:
            raise RuntimeError("nothing is hosted")
        info = host.info() if host is not None else None
        own = 0
        if info is not None and info.start_block is not None and info.end_block is not None:
            per_block = block_weight_bytes(sizing.model_config, quant=sizing.quant, dtype=sizing.dtype)
            own = per_block * (info.end_block - info.start_block) + info.cache_bytes_used
        free = placement.free_memory_bytes(sizing.device, own_bytes=own)
        return placement.plan_num_blocks(
            sizing.config,
            sizing.model_config,
            free_bytes=int(free * (fraction or 1.0)),
            dtype=sizing.dtype,
            quant=sizing.quant,
        )

    def set_memory_share(self, fraction: float) -> dict[str, Any]:
        """/api/hosting/resize: the user's memory share changed. With blocks "auto" the serving span grows or
        shrinks to fit it now (through a drain, same peer id); while paused, loading or moving it applies as
        soon as sharing serves again; a fixed span or count keeps its size (the share applies at the next
        start)."""
        if not 0.0 < fraction <= 1.0:
            raise InvalidRequestError(f"memory_fraction must be in (0, 1], got {fraction}")
        with self.core.lock:
            record, request = self.core.status_record, self._hosting_request
            active = (HostingState.LOADING, HostingState.SERVING, HostingState.DRAINING, HostingState.PAUSED)
            if record.state not in active or request is None or self._stop_requested:
                raise WrongStateError(
                    f"Sharing is {record.state}: the memory share applies when sharing starts."
                )
            self._hosting_request = {**request, "memory_fraction": fraction}
            if self._span_mode != SPAN_AUTO:
                return record.to_dict()
            self._share_pending = True
        try:
            self._apply_pending_share(strict=True)
        except InvalidRequestError:
            with self.core.lock:
                self._hosting_request = request  # the share in force stays the one that fits
            raise
        return self.core.status()

    def _apply_pending_share(self, strict: bool = False) -> None:
        """Resize to the memory share now if it changed while it could not be applied (in a thread).

        `strict`: a share too small for even one block is the caller's error (InvalidRequestError)."""
        from engine.server.placement import PlacementError

        with self.core.lock:
            server = self._server
            if not self._share_pending or server is None or not self.may_move():
                return
            self._share_pending = False
        try:
            wanted = self._blocks_for_share(self._memory_share())
        except PlacementError as exc:
            if strict:
                raise InvalidRequestError(f"That memory share is too small: {exc}") from exc
            logger.warning("the memory share cannot be applied: %s", exc)
            return
        self._wanted_before = None

        def resize() -> None:
            try:
                server.resize(wanted, MoveReason.SHARE)
            except Exception:
                logger.warning("resizing to the new memory share failed", exc_info=True)

        self.core.spawn(resize, "pollinate-resize")
