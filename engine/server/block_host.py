"""BlockHost: one block server's lifecycle — load a span, announce it, serve RPCs, leave cleanly.

The constructor only stores its arguments. `start()` does the work in Petals' order: resolve the checkpoint,
choose the span, announce JOINING, load the blocks, measure throughput (once per machine, cached), register
the RPC handlers on the DHT's p2p daemon, announce ONLINE. `drain()` steps aside politely (announce OFFLINE,
refuse new work, let open sessions finish for a grace period, end the rest so clients replay elsewhere),
then either frees everything (RELEASE, what `stop()` does) or keeps the weights for a quick `resume()`
(HOLD, what `pause()` does); engine/server/drain.py describes the steps.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import uvloop
from hivemind import DHT
from hivemind.p2p import P2P

from contract import LoadPhase
from engine.models.checkpoint import load_config, resolve_checkpoint
from engine.models.registry import family_for
from engine.models.span import load_block_span
from engine.server import placement, throughput
from engine.server.compute import HostedSpan, run_forward
from engine.server.config import ServerConfig
from engine.server.drain import DrainMode, DrainReport
from engine.server.handler import HandlerLimits, PriorityFn, TransformerConnectionHandler, UsageFn
from engine.server.memory_cache import MemoryCache
from engine.server.protocol import compression_type
from engine.server.task_pool import TaskKind, TaskPool
from engine.server.work_limits import WorkLimits
from engine.swarm.announce import Announcer
from engine.swarm.dht_node import start_dht
from engine.swarm.discovery import fetch_snapshot
from engine.swarm.keys import validate_dht_prefix
from engine.swarm.reachability import Reachability, ReachabilityService
from engine.swarm.records import ModelInfo, ServerInfo, ServerState

logger = logging.getLogger(__name__)

# What a draining server tells clients that still reach it (they fail over either way; the words say why).
PAUSING_MESSAGE = "this server is pausing (its owner needs the machine); use another server"
MOVING_MESSAGE = "this server is moving to other blocks; use another server"
STOPPING_MESSAGE = "this server is leaving the swarm; use another server"
END_WAIT_SECONDS = 10.0  # after the grace period, how long a drain waits for a computing step to finish


def pollinate_version() -> str:
    """The version string we announce (Petals shows it in its health monitor)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pollinate-{version('pollinate')}"
    except PackageNotFoundError:
        return "pollinate-dev"


def start_server_dht(config: ServerConfig) -> DHT:
    """The DHT peer a server announces and serves through, with the network options of `config`."""
    auto_relay = config.use_auto_relay
    if auto_relay is None:
        auto_relay = config.host not in ("127.0.0.1", "::1", "localhost")
    return start_dht(
        config.initial_peers,
        host=config.host,
        port=config.port,
        new_swarm=config.new_swarm,
        use_auto_relay=auto_relay,  # behind NAT, p2pd finds a relay and announces /p2p-circuit addresses
        **({"announce_maddrs": list(config.announce_maddrs)} if config.announce_maddrs else {}),
    )


class HostState(enum.Enum):
    """Where a BlockHost is in its life."""

    IDLE = "idle"
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    PAUSED = "paused"  # drained with DrainMode.HOLD: weights loaded, no work accepted
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class HostInfo:
    """A snapshot of a BlockHost for status pages and logs."""

    state: HostState
    model: str
    phase: LoadPhase | None = None  # the step of start() while loading
    phase_fraction: float = 0.0  # how far through that step (0..1)
    error: str | None = None  # why start() failed
    dht_prefix: str | None = None
    start_block: int | None = None
    end_block: int | None = None
    total_blocks: int | None = None
    hidden_size: int | None = None
    peer_id: str | None = None
    multiaddrs: tuple[str, ...] = ()
    throughput: float | None = None
    device: str | None = None
    dtype: str | None = None
    quant: str | None = None
    cache_bytes_total: int = 0
    cache_bytes_used: int = 0
    sessions_open: int = 0
    requests_served: int = 0
    tokens_served: int = 0
    reachability: Reachability | None = None


class BlockHost:
    """Hosts a span of a model's blocks in a swarm (see module docstring for the lifecycle).

    `dht` lets a service share its DHT peer; without it the host starts (and later stops) its own.
    `priority_fn(peer_id, kind, points) -> float` orders work in the compute loop (a delay in seconds,
    lower = sooner); `usage_fn(peer_id, kind, tokens, blocks, compute_seconds)` is told about every request
    served; `points_fn() -> float` gives the points announced in our DHT record (all three: engine.ledger).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        dht: DHT | None = None,
        priority_fn: PriorityFn | None = None,
        usage_fn: UsageFn | None = None,
        points_fn: Callable[[], float] | None = None,
        on_progress: Callable[[LoadPhase, float], None] | None = None,
    ):
        self.config = config
        self._given_dht = dht
        self.priority_fn, self.usage_fn, self.points_fn = priority_fn, usage_fn, points_fn
        self.dht: DHT | None = None
        self.state = HostState.IDLE
        self.on_progress = on_progress
        self.phase: LoadPhase | None = None
        self.phase_fraction = 0.0
        self.error: str | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._model_config = None
        self._dht_prefix: str | None = None
        self._span_range: tuple[int, int] | None = None
        self._device = self._dtype = self._quant = None
        self._throughput: float | None = None
        self._hosted: HostedSpan | None = None
        self._memory_cache: MemoryCache | None = None
        self._pool: TaskPool | None = None
        self._handler: TransformerConnectionHandler | None = None
        self._final_counts = (0, 0)  # (requests, tokens) served, kept when stop() drops the handler
        self._announcer: Announcer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._p2p: P2P | None = None
        self._throttle: tuple[int | None, float] = (None, 1.0)
        self._reachability: ReachabilityService | None = None
        self.reachability: Reachability | None = None  # the last dial-back check's verdict

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load, announce and start serving; returns when ONLINE. On failure cleans up and re-raises."""
        with self._lock:
            if self.state != HostState.IDLE:
                raise RuntimeError(
                    f"BlockHost.start() called in state {self.state.value}; make a new BlockHost"
                )
            self.state = HostState.LOADING
        try:
            self._start()
        except BaseException as error:
            self.error = f"{type(error).__name__}: {error}"
            logger.error("block server failed to start: %s", self.error)
            self._shutdown(grace_seconds=0.0)
            self.state = HostState.ERROR
            raise
        self.state = HostState.SERVING
        self._ready.set()

    def _enter(self, phase: LoadPhase) -> None:
        # Fraction first: a reader that sees the new phase never sees the old phase's fraction with it.
        self.phase_fraction = 0.0
        self.phase = phase
        self._report()

    def _loaded(self, done: int, total: int) -> None:
        self.phase_fraction = done / total
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None and self.phase is not None:
            try:
                self.on_progress(self.phase, self.phase_fraction)
            except Exception:  # a broken listener must not break the start
                logger.warning("progress listener failed", exc_info=True)

    def _start(self) -> None:
        config = self.config
        self._enter(LoadPhase.RESOLVING)
        path = resolve_checkpoint(config.model)
        model_config = self._model_config = load_config(path)
        family = family_for(model_config)
        dht_prefix = self._dht_prefix = validate_dht_prefix(
            config.dht_prefix or family.dht_prefix_for(model_config, config.model)
        )
        device = self._device = placement.resolve_device(config.device)
        dtype = self._dtype = placement.resolve_dtype(config.dtype, model_config, device)
        quant = self._quant = placement.resolve_quant(config.quant, device)
        total = model_config.num_hidden_layers

        self._enter(LoadPhase.JOINING)
        self.dht = self._given_dht or start_server_dht(config)
        throughputs = None
        if config.fixed_span is None:
            throughputs = fetch_snapshot(self.dht, dht_prefix, total).block_throughputs()
        plan = placement.plan_span(
            config,
            model_config,
            free_bytes=placement.free_memory_bytes(device),
            dtype=dtype,
            quant=quant,
            block_throughputs=throughputs,
        )
        start, end = self._span_range = (plan.start, plan.end)
        self._memory_cache = MemoryCache(plan.cache_bytes, config.max_alloc_timeout)

        server_info = ServerInfo(
            state=ServerState.JOINING,
            throughput=float(config.throughput or 0.0),
            public_name=config.public_name,
            version=pollinate_version(),
            torch_dtype=str(dtype).removeprefix("torch."),
            quant_type=quant,
            using_relay=False,
            cache_tokens_left=self._cache_tokens_left(model_config, dtype),
        )
        is_folder = Path(config.model).expanduser().is_dir()
        repository = config.repository or (None if is_folder else f"https://huggingface.co/{config.model}")
        self._announcer = Announcer(
            self.dht,
            dht_prefix,
            start,
            end,
            server_info,
            ModelInfo(num_blocks=total, repository=repository),
            update_period=config.update_period,
            fields_provider=lambda: self._fresh_fields(model_config, dtype),
        )
        self._announcer.start(wait=True)
        logger.info("announced blocks %d:%d of %s as joining", start, end, dht_prefix)

        self._enter(LoadPhase.LOADING_BLOCKS)
        span = load_block_span(
            path,
            start,
            end,
            dtype=dtype,
            device=device,
            quant=quant,
            on_block=lambda done: self._loaded(done, end - start),
        )
        self._hosted = HostedSpan(span)

        self._enter(LoadPhase.MEASURING)
        rates: dict[str, float] = {}
        if config.throughput is None:
            rates = throughput.get_throughput_info(span, config.model)
            self._throughput = throughput.server_throughput(rates, end - start)
        else:
            self._throughput = float(config.throughput)

        self._enter(LoadPhase.STARTING)
        self._pool = TaskPool()
        self._pool.start()
        self._handler = TransformerConnectionHandler(
            hosted=self._hosted,
            pool=self._pool,
            memory_cache=self._memory_cache,
            dht_prefix=dht_prefix,
            limits=HandlerLimits(
                inference_max_length=config.inference_max_length,
                request_timeout=config.request_timeout,
                session_timeout=config.session_timeout,
                step_timeout=config.step_timeout,
                default_alloc_timeout=config.default_alloc_timeout,
                work=WorkLimits(
                    max_request_tokens=config.max_request_tokens,
                    max_request_bytes=config.max_request_bytes,
                    forward_chunk_tokens=config.forward_chunk_tokens,
                ),
            ),
            compression=compression_type(config.compression),
            dht_client_mode=self.dht.client_mode,
            version=pollinate_version(),
            priority_fn=self.priority_fn,
            usage_fn=self.usage_fn,
        )
        self.set_throttle(*self._throttle)  # a throttle set before the start applies from the first request
        self._start_loop()
        daemon_maddr = self.dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr)
        self._run(self._register_handlers(daemon_maddr), timeout=60)

        extra = {
            k: float(v) for k, v in rates.items() if k in ("inference_rps", "forward_rps", "network_rps")
        }
        self._announcer.update(state=ServerState.ONLINE, throughput=self._throughput, wait=True, **extra)
        self.phase, self.phase_fraction = None, 0.0
        # Peers that check their own reachability ask us to dial them back (Petals' rpc_check).
        self._reachability = ReachabilityService(self.dht).start()
        if config.check_reachability:
            threading.Thread(
                target=self.check_reachability, name="pollinate-reachability-check", daemon=True
            ).start()
        logger.info("serving blocks %d:%d of %s (throughput %.1f)", start, end, dht_prefix, self._throughput)

    def check_reachability(self) -> Reachability | None:
        """Ask other peers to dial us back, keep the verdict and announce it (None if not serving)."""
        service, announcer = self._reachability, self._announcer
        if service is None or announcer is None:
            return None
        try:
            verdict = service.check()
        except Exception:
            logger.warning("the reachability check failed", exc_info=True)
            return None
        self.reachability = verdict
        if self.state == HostState.SERVING:
            announcer.update(reachability=verdict.state, using_relay=verdict.state == "relayed")
        if verdict.advice:
            logger.warning("%s", verdict.advice)
        return verdict

    def stop(self, grace_seconds: float = 0.0) -> None:
        """Drain with DrainMode.RELEASE: announce OFFLINE, let sessions finish, end the rest, free all."""
        self.drain(grace_seconds, DrainMode.RELEASE, reason=STOPPING_MESSAGE)

    def pause(self, grace_seconds: float = 0.0) -> DrainReport:
        """Drain with DrainMode.HOLD: stop accepting work but keep the weights loaded (see resume())."""
        return self.drain(grace_seconds, DrainMode.HOLD)

    def drain(
        self, grace_seconds: float, mode: DrainMode = DrainMode.RELEASE, reason: str = PAUSING_MESSAGE
    ) -> DrainReport:
        """Step aside without breaking anyone's chat (the steps: engine/server/drain.py).

        Announces OFFLINE and refuses new requests with `reason` (what clients read: pausing by default,
        moving for a rebalance), lets open inference sessions run for up to `grace_seconds`, then ends the
        rest (our client replays them elsewhere with the same tokens). RELEASE then frees weights, caches
        and handlers (state STOPPED); HOLD keeps the weights (state PAUSED, `resume()` serves again).
        Thread-safe; blocks until done.
        """
        started = time.monotonic()
        with self._lock:
            if self.state in (HostState.STOPPED, HostState.IDLE) or (
                self.state == HostState.PAUSED and mode == DrainMode.HOLD
            ):
                if self.state == HostState.IDLE:
                    self.state = HostState.STOPPED
                return DrainReport(mode, grace_seconds, 0, 0, 0.0, 0.0)
            if self.state == HostState.DRAINING:
                raise RuntimeError("the block server is already draining")
            was_serving = self.state in (HostState.SERVING, HostState.PAUSED)
            self.state = HostState.DRAINING
            self._ready.clear()
        at_start = ended = 0
        if was_serving:
            at_start, ended = self._drain_sessions(grace_seconds, reason)
        quiet = time.monotonic() - started
        if mode == DrainMode.HOLD:
            self.state = HostState.PAUSED
        else:
            self._shutdown(grace_seconds=0.0)
            self.state = HostState.STOPPED
        report = DrainReport(mode, grace_seconds, at_start, ended, quiet, time.monotonic() - started)
        logger.info("drained (%s): %s", mode.value, report)
        return report

    def set_throttle(self, max_sessions: int | None = None, compute_share: float = 1.0) -> None:
        """Cap what sharing uses while active: inference sessions at once (None: no cap) and the share of
        compute time (0 < share <= 1; the compute loop rests in between). Takes effect at once."""
        if not 0.0 < compute_share <= 1.0:
            raise ValueError(f"compute_share must be in (0, 1], got {compute_share}")
        self._throttle = (max_sessions, compute_share)
        if self._handler is not None:
            self._handler.max_sessions = max_sessions
        if self._pool is not None:
            self._pool.compute_share = compute_share

    def resume(self) -> None:
        """Serve again after pause(): accept work and announce ONLINE (one DHT round, about a second)."""
        with self._lock:
            if self.state != HostState.PAUSED:
                raise RuntimeError(f"BlockHost.resume() needs a paused host, not {self.state.value}")
            self.state = HostState.LOADING
        self._on_loop(self._handler.accept_work)
        self._announcer.update(state=ServerState.ONLINE, wait=True)
        self.state = HostState.SERVING
        self._ready.set()

    def _drain_sessions(self, grace_seconds: float, reason: str = STOPPING_MESSAGE) -> tuple[int, int]:
        """Announce OFFLINE, refuse new work, wait up to the grace period, end what is left.

        Returns (sessions open at the start, sessions ended by us).
        """
        handler = self._handler
        at_start = 0
        if handler is not None:
            handler.refuse_new_work(reason)
            at_start = handler.stats.sessions_open
        if self._announcer is not None:
            _guard("announce OFFLINE", lambda: self._announcer.update(state=ServerState.OFFLINE, wait=True))
        if handler is None:
            return 0, 0
        deadline = time.monotonic() + grace_seconds
        while handler.stats.sessions_open > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = handler.stats.sessions_open
        if ended:
            _guard("end the open sessions", lambda: self._on_loop(handler.end_open_sessions))
            # A session ends at its next step boundary; a step already computing finishes first.
            deadline = time.monotonic() + END_WAIT_SECONDS
            while handler.stats.sessions_open > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        return at_start, ended

    def _on_loop(self, action) -> None:
        if self._loop is None:
            return

        async def call():
            action()

        self._run(call(), timeout=10)

    def _shutdown(self, grace_seconds: float) -> None:
        # Each step is guarded: a failure in one must not keep the others (and the memory) from being freed.
        if self._announcer is not None:
            _guard("announce OFFLINE", self._announcer.stop)
        if self._handler is not None and grace_seconds > 0:
            self._drain_sessions(grace_seconds)
        if self._reachability is not None:
            _guard("stop the reachability service", self._reachability.stop)
            self._reachability = None
        if self._loop is not None:
            _guard("remove RPC handlers", lambda: self._run(self._unregister_handlers(), timeout=10))
            _guard("stop the handler loop", self._stop_loop)
        if self._pool is not None:
            _guard("stop the compute loop", self._pool.stop)
        if self._hosted is not None:
            self._hosted.release()
        if self._handler is not None:  # info() keeps reporting what this host served after it stopped
            stats = self._handler.stats
            self._final_counts = (stats.requests, stats.tokens)
        self._hosted = self._handler = self._pool = None
        gc.collect()
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.empty_cache()
        if self.dht is not None and self._given_dht is None:
            _guard("shut the DHT peer down", self.dht.shutdown)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the host is serving (True) or `timeout` passes (False)."""
        return self._ready.wait(timeout)

    def info(self) -> HostInfo:
        """A snapshot of the host's state and counters."""
        start, end = self._span_range or (None, None)
        stats = self._handler.stats if self._handler is not None else None
        cache = self._memory_cache
        peer_id = multiaddrs = None
        if self.dht is not None and self.state in (HostState.SERVING, HostState.PAUSED):
            peer_id = self.dht.peer_id.to_base58()
            try:
                multiaddrs = tuple(str(a) for a in self.dht.get_visible_maddrs())
            except ValueError:  # a daemon that does not listen (reached through relays only) has none
                multiaddrs = ()
        return HostInfo(
            state=self.state,
            model=self.config.model,
            phase=self.phase,
            phase_fraction=self.phase_fraction,
            error=self.error,
            dht_prefix=self._dht_prefix,
            start_block=start,
            end_block=end,
            total_blocks=self._model_config.num_hidden_layers if self._model_config is not None else None,
            hidden_size=self._model_config.hidden_size if self._model_config is not None else None,
            peer_id=peer_id,
            multiaddrs=multiaddrs or (),
            throughput=self._throughput,
            device=str(self._device) if self._device is not None else None,
            dtype=str(self._dtype).removeprefix("torch.") if self._dtype is not None else None,
            quant=self._quant,
            cache_bytes_total=cache.max_size_bytes if cache else 0,
            cache_bytes_used=cache.used_bytes if cache else 0,
            sessions_open=stats.sessions_open if stats else 0,
            requests_served=stats.requests if stats else self._final_counts[0],
            tokens_served=stats.tokens if stats else self._final_counts[1],
            reachability=self.reachability,
        )

    def run_local_forward(
        self, start: int, end: int, hidden: torch.Tensor, timeout: float = 60.0
    ) -> torch.Tensor:
        """Our own outputs of blocks [start, end) for `hidden`, computed on the compute loop.

        The ledger uses it to check another server's answer to a probe against our own computation.
        """
        hosted, pool = self._hosted, self._pool
        if hosted is None or pool is None or self.state != HostState.SERVING:
            raise RuntimeError("the block server is not serving")
        future = pool.submit(run_forward, hosted.view(start, end), hidden, None, kind=TaskKind.FORWARD)
        return future.result(timeout)

    # --- internals ----------------------------------------------------------------------------------------

    def _fresh_fields(self, model_config, dtype) -> dict:
        fields: dict = {"cache_tokens_left": self._cache_tokens_left(model_config, dtype)}
        if self.points_fn is not None:
            try:
                fields["points"] = float(self.points_fn())
            except Exception:
                logger.warning("points callback failed", exc_info=True)
        return fields

    def _cache_tokens_left(self, model_config, dtype) -> int:
        # Petals' DHT unit: one key (or value) vector of one block per token, so clients check
        # `max_length * 2 * num_blocks <= cache_tokens_left`.
        from engine.models.cache import cache_bytes

        per_vector = max(1, cache_bytes(model_config, 1, 1, 1, dtype) // 2)
        return int(self._memory_cache.bytes_left // per_vector) if self._memory_cache is not None else 0

    def _start_loop(self) -> None:
        # uvloop: every step's messages pass through this loop's sockets (to and from the p2p daemon), and
        # uvloop's are cheaper per message than asyncio's selector loop.
        self._loop = uvloop.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="pollinate-rpc", daemon=True)
        self._loop_thread.start()

    def _run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _register_handlers(self, daemon_maddr) -> None:
        # A replica of our own: DHT.replicate_p2p caches one per DHT, bound to the first loop that asked.
        self._p2p = await P2P.replicate(daemon_maddr)
        await self._handler.add_p2p_handlers(self._p2p)

    async def _unregister_handlers(self) -> None:
        if self._p2p is None:
            return
        if self._handler is not None:
            await self._handler.remove_p2p_handlers(self._p2p)
        await self._p2p.shutdown()
        self._p2p = None

    def _stop_loop(self) -> None:
        loop = self._loop

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._loop_thread.join(10)
        loop.close()
        self._loop = self._loop_thread = None


def _guard(what: str, action) -> None:
    try:
        action()
    except Exception:
        logger.warning("while stopping the block server: could not %s", what, exc_info=True)
