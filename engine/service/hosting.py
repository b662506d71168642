"""Hosting: the user's block server and its state machine (idle -> loading -> serving -> draining -> idle).

A mixin of EngineService (engine/service/engine.py), which owns the state, lock and events it uses.
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
from engine.service.errors import InvalidRequestError, WrongStateError

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


class HostingMixin:
    """Plan, start and stop the user's hosting (one BlockHost at a time)."""

    def _server_config(self, ref: ModelRef, span: tuple[int, int] | None, quant: str | None, num_blocks=None):
        from engine.models.tiny import is_tiny_checkpoint
        from engine.server.config import ConfigError, ServerConfig

        local = self.config.swarm == "local"
        try:
            return ServerConfig(
                model=ref.source,
                start_block=span[0] if span else None,
                end_block=span[1] if span else None,
                num_blocks=num_blocks,
                dht_prefix=ref.dht_prefix,
                initial_peers=self._peer_addresses(),
                host="127.0.0.1" if local else "0.0.0.0",
                quant=quant or "auto",
                # Tiny random checkpoints are for tests, and the demo swarm is this one machine: measuring
                # would only cost time.
                throughput=1.0 if ref.demo or is_tiny_checkpoint(ref.source) else None,
            )
        except ConfigError as exc:
            raise InvalidRequestError(str(exc)) from exc

    def _plan(self, ref: ModelRef, blocks: str | None, quant: str | None, memory_fraction: float | None):
        """(ServerConfig with a fixed span, plan facts) for hosting `ref`; what start and /plan both use."""
        from engine.models import load_config, resolve_checkpoint
        from engine.server import placement

        span = None
        if blocks and blocks != "auto":
            span = tuple(int(x) for x in blocks.split(":"))
            if not 0 <= span[0] < span[1] <= ref.num_blocks:
                raise InvalidRequestError(
                    f"blocks {blocks} do not exist: {ref.name} has {ref.num_blocks} blocks "
                    f"(0:{ref.num_blocks})"
                )
        config = self._server_config(ref, span, quant)
        model_config = load_config(resolve_checkpoint(ref.source))
        try:
            device = placement.resolve_device(config.device)
            dtype = placement.resolve_dtype(config.dtype, model_config, device)
            quant_name = placement.resolve_quant(config.quant, device)
            budget = int(placement.free_memory_bytes(device) * (memory_fraction or 1.0))
            throughputs = None if span else self._snapshot(ref).block_throughputs()
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
        config = config.replace(start_block=plan.start, end_block=plan.end)
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
        return config, facts

    def hosting_plan(self, model: str | None, quant: str | None = None, memory_fraction: float | None = None):
        """/api/hosting/plan: which blocks hosting `model` would take and the memory it would use, for the
        quantization and memory share the user chose (a contract.HostingPlan)."""
        return self._plan(self._find_model(model), None, quant, memory_fraction)[1]

    def start_hosting(self, model=None, blocks=None, quant=None, memory_fraction=None) -> dict[str, Any]:
        """Start sharing blocks; returns at once with state "loading" (progress follows in events)."""
        with self._lock:
            if self._status.state not in (HostingState.IDLE, HostingState.ERROR):
                raise WrongStateError(
                    f"Hosting is already {self._status.state}; stop it before starting again."
                )
        return self._start_host(
            model, blocks, quant, memory_fraction, (HostingState.IDLE, HostingState.ERROR)
        )

    def _start_host(self, model, blocks, quant, memory_fraction, from_states) -> dict[str, Any]:
        from engine.server.block_host import BlockHost

        ref = self._find_model(model)
        config, facts = self._plan(ref, blocks, quant, memory_fraction)
        with self._lock:
            if self._status.state not in from_states:
                raise WrongStateError(f"Hosting is already {self._status.state}.")
            host = self._host = BlockHost(config, on_progress=self._hosting_progress, **self.host_hooks())
            host.set_throttle(*self._throttle)
            self._stop_requested = False
            # What a pause that released the weights needs to start the same hosting again.
            self._hosting_request = dict(
                model=model, blocks=blocks, quant=quant, memory_fraction=memory_fraction
            )
        status = self._set_status(
            state=HostingState.LOADING,
            progress=0.0,
            phase=LoadPhase.PREPARING,
            message=LoadPhase.PREPARING.words,
            model=ref.name,
            blocks=[facts["start_block"], facts["end_block"]],
        )
        self._spawn(lambda: self._run_host(host), "pollinate-hosting")
        return status

    def _hosting_progress(self, phase: LoadPhase, fraction: float) -> None:
        """BlockHost's report of where its start is (called from its thread)."""
        if self._status.state == HostingState.LOADING:
            self._set_status(phase=phase, progress=hosting_progress(phase, fraction), message=phase.words)

    def _run_host(self, host) -> None:
        try:
            host.start()
        except Exception as exc:
            logger.warning("hosting failed to start: %s", exc)
            with self._lock:
                self._host = None
            _release_memory()
            self._set_status(
                state=HostingState.ERROR,
                progress=None,
                phase=None,
                message=f"Hosting failed: {exc}",
                blocks=None,
            )
            return
        self._start_auditor(host)
        self._spawn(lambda: self._report_reachability(host), "pollinate-reachability")
        with self._lock:
            self._hosting_since = time.time()
            stop_now = self._stop_requested
        self._set_status(state=HostingState.SERVING, progress=None, phase=None, message=None, pause=None)
        if stop_now:  # stop was asked for while loading
            self._drain(host, 0.0)

    def _report_reachability(self, host, timeout: float = 120.0) -> None:
        """Put the host's dial-back verdict into the status once its check finished."""
        deadline = time.monotonic() + timeout
        while host.reachability is None and time.monotonic() < deadline and not self._closing.is_set():
            time.sleep(0.5)
        with self._lock:
            current = self._host is host
        if current and host.reachability is not None:
            self._set_status(reachability=host.reachability.to_dict())

    def _start_auditor(self, host) -> None:
        """Probe the servers next to our span while we serve (engine.ledger: verified contribution)."""
        if self.ledger is None:
            return
        from engine.ledger import Auditor

        auditor = Auditor(self.ledger, host)
        auditor.start()
        with self._lock:
            self._auditor = auditor

    def stop_hosting(self, grace_seconds: float | None = None) -> dict[str, Any]:
        """Stop sharing: announce OFFLINE, let sessions finish within the grace period, free memory.

        Also ends a pause (sharing stays off until started again).
        """
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        with self._lock:
            state, host = self._status.state, self._host
            nothing_runs = state == HostingState.ERROR or (state == HostingState.PAUSED and host is None)
            if nothing_runs:  # an error, or a pause that freed the weights: acknowledge, go back to idle
                self._status = self._status.replace(
                    state=HostingState.IDLE,
                    progress=None,
                    phase=None,
                    message=None,
                    model=None,
                    blocks=None,
                    pause=None,
                )
            elif state in (HostingState.IDLE, HostingState.DRAINING):
                raise WrongStateError(f"Hosting is {state}; there is nothing to stop.")
            elif state == HostingState.LOADING:
                self._stop_requested = True
        if nothing_runs:
            status = self.status()
            self._emit("status", status)
            return status
        status = self._set_status(
            state=HostingState.DRAINING,
            progress=None,
            phase=None,
            message="Letting running sessions finish",
            pause=None,
        )
        if state in (HostingState.SERVING, HostingState.PAUSED):
            self._spawn(lambda: self._drain(host, grace), "pollinate-draining")
        return status

    def _stop_auditor(self) -> None:
        with self._lock:
            auditor, self._auditor = self._auditor, None
        if auditor is not None:
            try:
                auditor.stop()
            except Exception:
                logger.warning("error while stopping the ledger's auditor", exc_info=True)

    def _drain(self, host, grace: float) -> None:
        if self._status.state != HostingState.DRAINING:
            self._set_status(
                state=HostingState.DRAINING,
                progress=None,
                phase=None,
                message="Letting running sessions finish",
            )
        self._stop_auditor()
        try:
            host.stop(grace_seconds=grace)
        except Exception:
            logger.warning("error while stopping the block host", exc_info=True)
        self._account_host(host)
        with self._lock:
            if self._host is host:
                self._host = None
        del host
        _release_memory()
        self._set_status(
            state=HostingState.IDLE,
            progress=None,
            phase=None,
            message=None,
            model=None,
            blocks=None,
            reachability=None,
        )

    def _account_host(self, host) -> None:
        """Add a stopped host's counters to the totals; end the current stretch of sharing time."""
        info = host.info()  # the counters outlive stop(): they include the sessions that drained
        with self._lock:
            self._served["tokens"] += info.tokens_served
            self._served["requests"] += info.requests_served
            self._end_sharing_stretch()

    def _end_sharing_stretch(self) -> None:
        # Called with the lock held: sharing time counts only while serving (not loading, draining, paused).
        if self._hosting_since is not None:
            self._hosting_seconds += time.time() - self._hosting_since
        self._hosting_since = None
