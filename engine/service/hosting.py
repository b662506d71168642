"""Hosting: the user's block server and its state machine (idle -> loading -> serving -> draining -> idle).

A part of EngineService (engine/service/engine.py): it uses the ServiceCore and the Catalog; its pause half
is engine/service/pausing.py, its move half (rebalancing, live resize) engine/service/moving.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
import time
from typing import Any

from contract import HostingPlan, HostingState, LoadPhase, hosting_progress
from engine.service.config import ModelRef
from engine.service.core import ServiceCore
from engine.service.errors import InvalidRequestError, WrongStateError
from engine.service.models import Catalog
from engine.service.moving import SPAN_COUNT, SPAN_FIXED, MoveMixin, Sizing, span_mode
from engine.service.pausing import PauseMixin

logger = logging.getLogger(__name__)


def _release_memory() -> None:
    """Give freed memory back to the OS (glibc keeps freed heap pages unless asked) and to the GPU."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Hosting(PauseMixin, MoveMixin):
    """Plan, start, pause, move and stop the user's hosting (one BlockHost at a time, under a Rebalancer that
    owns its DHT peer), and count what it served."""

    def __init__(self, core: ServiceCore, catalog: Catalog):
        self.core = core
        self.catalog = catalog
        self._host = None  # the user's BlockHost while hosting (or paused with its weights held)
        self._server = None  # the Rebalancer that owns its DHT peer and moves it (engine/service/moving.py)
        self._hosting_request: dict[str, Any] | None = None  # start_hosting's arguments, to resume a pause
        self._stop_requested = False
        self._served = {"tokens": 0, "requests": 0}  # from hosts that already stopped
        self._hosting_since: float | None = None
        self._hosting_seconds = 0.0
        self._auditor = None  # probes the servers next to the user's hosting while it serves

    def counters(self) -> tuple[dict[str, Any], Any]:
        """(served counters since the engine started, the running host's info or None)."""
        with self.core.lock:
            host = self._host
            hosting = self._hosting_seconds
            if self._hosting_since is not None:
                hosting += time.time() - self._hosting_since
            served = dict(self._served)
        info = host.info() if host is not None else None
        return (
            dict(
                tokens_served=served["tokens"] + (info.tokens_served if info else 0),
                requests_served=served["requests"] + (info.requests_served if info else 0),
                hosting_seconds=round(hosting, 3),
                moves=self._moves,
            ),
            info,
        )

    def take_for_close(self) -> tuple[Any, Any]:
        """(server, auditor), handed over for stopping (the engine is stopping): the server (a Rebalancer)
        stops its host and its DHT peer."""
        with self.core.lock:
            server, self._server, self._host = self._server, None, None
            auditor, self._auditor = self._auditor, None
        return server, auditor

    def _server_config(self, ref: ModelRef, span: tuple[int, int] | None, quant: str | None, num_blocks=None):
        from engine.models.tiny import is_tiny_checkpoint
        from engine.server.config import ConfigError, ServerConfig

        local = self.core.config.swarm == "local"
        try:
            return ServerConfig(
                model=ref.source,
                start_block=span[0] if span else None,
                end_block=span[1] if span else None,
                num_blocks=num_blocks,
                dht_prefix=ref.dht_prefix,
                initial_peers=self.core.peer_addresses(),
                host="127.0.0.1" if local else "0.0.0.0",
                quant=quant or "auto",
                # Tiny random checkpoints are for tests, and the demo swarm is this one machine: measuring
                # would only cost time.
                throughput=1.0 if ref.demo or is_tiny_checkpoint(ref.source) else None,
            )
        except ConfigError as exc:
            raise InvalidRequestError(str(exc)) from exc

    def _plan(self, ref: ModelRef, blocks: str | None, quant: str | None, memory_fraction: float | None):
        """(ServerConfig with a fixed span, plan facts, Sizing) for hosting `ref`; what start and /plan use.

        `blocks`: "auto"/None (as many as fit in the memory share), "N" (that many) or "A:B" (that span)."""
        from engine.models import load_config, resolve_checkpoint
        from engine.server import placement

        span = count = None
        mode = span_mode(blocks)
        if mode == SPAN_FIXED:
            span = tuple(int(x) for x in blocks.split(":"))
            if not 0 <= span[0] < span[1] <= ref.num_blocks:
                raise InvalidRequestError(
                    f"blocks {blocks} do not exist: {ref.name} has {ref.num_blocks} blocks "
                    f"(0:{ref.num_blocks})"
                )
        elif mode == SPAN_COUNT:
            count = int(blocks)
            if not 1 <= count <= ref.num_blocks:
                raise InvalidRequestError(
                    f"cannot host {count} blocks: {ref.name} has {ref.num_blocks} blocks (give 1 to "
                    f"{ref.num_blocks}, a span A:B or auto)"
                )
        config = self._server_config(ref, span, quant, num_blocks=count)
        model_config = load_config(resolve_checkpoint(ref.source))
        try:
            device = placement.resolve_device(config.device)
            dtype = placement.resolve_dtype(config.dtype, model_config, device)
            quant_name = placement.resolve_quant(config.quant, device)
            budget = int(placement.free_memory_bytes(device) * (memory_fraction or 1.0))
            throughputs = None if span else self.catalog.snapshot(ref).block_throughputs()
            plan = placement.plan_span(
                config,
                model_config,
                free_bytes=budget,
                dtype=dtype,
                quant=quant_name,
                block_throughputs=throughputs,
            )
        except placement.PlacementError as exc:
            raise InvalidRequestError(str(exc)) from exc
        # What live resizing needs to size the span for a memory budget again (engine/service/moving.py).
        unplaced = config.replace(start_block=None, end_block=None, num_blocks=None)
        sizing = Sizing(unplaced, model_config, dtype, quant_name, device)
        config = config.replace(start_block=plan.start, end_block=plan.end, num_blocks=None)
        facts = HostingPlan(
            model=ref.name,
            dht_prefix=ref.dht_prefix,
            start_block=plan.start,
            end_block=plan.end,
            num_blocks=plan.num_blocks,
            total_blocks=ref.num_blocks,
            quant=quant_name,
            dtype=str(dtype).removeprefix("torch."),
            device=device.type,
            # Where the blocks live: a GPU's own memory, or main memory (CPU; Apple's unified memory).
            memory_kind="gpu" if device.type == "cuda" else "ram",
            budget_bytes=budget,
            weights_bytes=int(plan.weights_bytes),
            cache_bytes=int(plan.cache_bytes),
            total_bytes=int(plan.weights_bytes + plan.cache_bytes),
        ).to_dict()
        return config, facts, sizing

    def hosting_plan(self, model: str | None, quant: str | None = None, memory_fraction: float | None = None):
        """/api/hosting/plan: which blocks hosting `model` would take and the memory it would use, for the
        quantization and memory share the user chose (a contract.HostingPlan)."""
        return self._plan(self.catalog.find_model(model), None, quant, memory_fraction)[1]

    def start_hosting(self, model=None, blocks=None, quant=None, memory_fraction=None) -> dict[str, Any]:
        """Start sharing blocks; returns at once with state "loading" (progress follows in events)."""
        with self.core.lock:
            if self.core.status_record.state not in (HostingState.IDLE, HostingState.ERROR):
                raise WrongStateError(
                    f"Hosting is already {self.core.status_record.state}; stop it before starting again."
                )
        return self._start_host(
            model, blocks, quant, memory_fraction, (HostingState.IDLE, HostingState.ERROR)
        )

    def _start_host(self, model, blocks, quant, memory_fraction, from_states) -> dict[str, Any]:
        ref = self.catalog.find_model(model)
        config, facts, sizing = self._plan(ref, blocks, quant, memory_fraction)
        with self.core.lock:
            if self.core.status_record.state not in from_states:
                raise WrongStateError(f"Hosting is already {self.core.status_record.state}.")
            mode = span_mode(blocks)
            server = self._server = self._new_server(config, mode)
            self._span_mode, self._sizing, self._wanted_before = mode, sizing, None
            self._stop_requested = self._share_pending = False
            # What a pause that released the weights needs to start the same hosting again.
            self._hosting_request = dict(
                model=model, blocks=blocks, quant=quant, memory_fraction=memory_fraction
            )
        status = self.core.set_status(
            state=HostingState.LOADING,
            progress=0.0,
            phase=LoadPhase.PREPARING,
            message=LoadPhase.PREPARING.words,
            model=ref.name,
            blocks=[facts["start_block"], facts["end_block"]],
        )
        self.core.spawn(lambda: self._run_host(server), "pollinate-hosting")
        return status

    def _hosting_progress(self, phase: LoadPhase, fraction: float) -> None:
        """BlockHost's report of where its start is (called from its thread)."""
        if self.core.status_record.state == HostingState.LOADING:
            self.core.set_status(phase=phase, progress=hosting_progress(phase, fraction), message=phase.words)

    def _run_host(self, server) -> None:
        try:
            host = server.start()
        except Exception as exc:
            logger.warning("hosting failed to start: %s", exc)
            with self.core.lock:
                self._host = None
                if self._server is server:
                    self._server = None
            _release_memory()
            self.core.set_status(
                state=HostingState.ERROR,
                progress=None,
                phase=None,
                message=f"Hosting failed: {exc}",
                blocks=None,
            )
            return
        self._start_auditor(host)
        self.core.spawn(lambda: self._report_reachability(host), "pollinate-reachability")
        with self.core.lock:
            self._hosting_since = time.time()
            stop_now = self._stop_requested
        self.core.set_status(state=HostingState.SERVING, progress=None, phase=None, message=None, pause=None)
        if stop_now:  # stop was asked for while loading
            self._drain(server, 0.0)
        else:
            self._apply_pending_share()

    def _report_reachability(self, host, timeout: float = 120.0) -> None:
        """Put the host's dial-back verdict into the status once its check finished."""
        deadline = time.monotonic() + timeout
        while host.reachability is None and time.monotonic() < deadline and not self.core.closing.is_set():
            time.sleep(0.5)
        with self.core.lock:
            current = self._host is host
        if current and host.reachability is not None:
            self.core.set_status(reachability=host.reachability.to_dict())

    def _start_auditor(self, host) -> None:
        """Probe the servers next to our span while we serve (engine.ledger: verified contribution)."""
        if self.core.ledger is None:
            return
        from engine.ledger import Auditor

        auditor = Auditor(self.core.ledger, host)
        auditor.start()
        with self.core.lock:
            self._auditor = auditor

    def stop_hosting(self, grace_seconds: float | None = None) -> dict[str, Any]:
        """Stop sharing: announce OFFLINE, let sessions finish within the grace period, free memory.

        Also ends a pause (sharing stays off until started again).
        """
        grace = self.core.config.grace_seconds if grace_seconds is None else grace_seconds
        with self.core.lock:
            state, server, host = self.core.status_record.state, self._server, self._host
            moving = self.core.status_record.move is not None
            nothing_runs = state == HostingState.ERROR or (state == HostingState.PAUSED and host is None)
            if nothing_runs:  # an error, or a pause that freed the weights: acknowledge, go back to idle
                self.core.status_record = self.core.status_record.replace(
                    state=HostingState.IDLE,
                    progress=None,
                    phase=None,
                    message=None,
                    model=None,
                    blocks=None,
                    pause=None,
                )
            elif moving:  # the move ends after its drain (or its load), then everything stops
                self._stop_requested = True
                self.core.status_record = self.core.status_record.replace(move=None)
            elif state in (HostingState.IDLE, HostingState.DRAINING):
                raise WrongStateError(f"Hosting is {state}; there is nothing to stop.")
            elif state == HostingState.LOADING:
                self._stop_requested = True
            else:  # serving or paused: marked at once, so a move that starts now sees "draining"
                self.core.status_record = self.core.status_record.replace(state=HostingState.DRAINING)
        if nothing_runs:
            status = self.core.status()
            self.core.emit("status", status)
            return status
        status = self.core.set_status(
            state=HostingState.DRAINING,
            progress=None,
            phase=None,
            message="Letting running sessions finish",
            pause=None,
        )
        if state in (HostingState.SERVING, HostingState.PAUSED) and not moving:
            self.core.spawn(lambda: self._drain(server, grace), "pollinate-draining")
        return status

    def _stop_auditor(self) -> None:
        with self.core.lock:
            auditor, self._auditor = self._auditor, None
        if auditor is not None:
            try:
                auditor.stop()
            except Exception:
                logger.warning("error while stopping the ledger's auditor", exc_info=True)

    def _drain(self, server, grace: float) -> None:
        """Stop the hosting of `server` (a Rebalancer, or None after a pause freed it): drain, free, idle."""
        if self.core.status_record.state != HostingState.DRAINING:
            self.core.set_status(
                state=HostingState.DRAINING,
                progress=None,
                phase=None,
                message="Letting running sessions finish",
            )
        self._stop_auditor()
        host = server.host if server is not None else None
        try:
            if server is not None:
                server.stop(grace_seconds=grace)  # the host, then the DHT peer
        except Exception:
            logger.warning("error while stopping the block host", exc_info=True)
        if host is not None:
            self._account_host(host)
        with self.core.lock:
            if self._host is host:
                self._host = None
            if self._server is server:
                self._server = None
        del host
        _release_memory()
        self.core.set_status(
            state=HostingState.IDLE,
            progress=None,
            phase=None,
            message=None,
            model=None,
            blocks=None,
            reachability=None,
            move=None,
        )

    def _account_host(self, host) -> None:
        """Add a stopped host's counters to the totals; end the current stretch of sharing time."""
        info = host.info()  # the counters outlive stop(): they include the sessions that drained
        with self.core.lock:
            self._served["tokens"] += info.tokens_served
            self._served["requests"] += info.requests_served
            self._end_sharing_stretch()

    def _end_sharing_stretch(self) -> None:
        # Called with the lock held: sharing time counts only while serving (not loading, draining, paused).
        if self._hosting_since is not None:
            self._hosting_seconds += time.time() - self._hosting_since
        self._hosting_since = None
