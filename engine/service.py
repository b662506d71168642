"""EngineService: the long-lived engine behind `pollinate-engine run` (DHT peer, swarm client, block hosts).

It owns the lifecycle of its parts, the hosting state machine (idle -> loading -> serving -> draining ->
idle, or error), counters for /api/stats and a fan-out of status/stats events. It knows nothing of HTTP:
failures are ServiceErrors with a `type` that engine.api maps to status codes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# ---- errors: "this request failed" (the engine lives on) ------------------------------------------------


class ServiceError(Exception):
    """A request the service cannot honour; `type` names the kind (docs/API.md, Errors)."""

    type = "internal_error"

    def extra(self) -> dict[str, Any]:
        """Extra fields for the JSON error body."""
        return {}


class InvalidRequestError(ServiceError):
    type = "invalid_request"


class ModelNotFoundError(ServiceError):
    type = "model_not_found"


class WrongStateError(ServiceError):
    type = "wrong_state"


class SwarmUnavailableError(ServiceError):
    """The swarm cannot serve the model now (blocks without a server), or the engine is not ready yet."""

    type = "swarm_unavailable"

    def __init__(self, message: str, missing_blocks: tuple[int, ...] | list[int] = ()):
        super().__init__(message)
        self.missing_blocks = [int(b) for b in missing_blocks]

    def extra(self) -> dict[str, Any]:
        return {"missing_blocks": self.missing_blocks} if self.missing_blocks else {}


# ---- generation requests and their events ---------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: a chat (`messages`, rendered with the model's chat template) or a raw `prompt`."""

    model: str
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    prompt: str | None = None
    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0  # 0: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        assert (self.messages is None) != (self.prompt is None), "give messages or prompt"


@dataclass(frozen=True)
class Started:
    """The inference session is open; generation follows."""

    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    """New text (whole characters; a stop sequence is never split across deltas)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end: why, and how many tokens went in and came out."""

    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


GenerationEvent = Started | TextDelta | Finished


# ---- configuration ------------------------------------------------------------------------------------

SWARM_CHOICES = ("local", "public", "private")
SWARM_INDEX_TTL = 5.0  # seconds a read of the swarm's model index is reused
BASE_PRIORITY = 1.0  # TODO(ledger issue): earned priority and points come from engine.ledger once it exists
HOSTING_PROGRESS = (  # BlockHost.message prefixes -> progress of a hosting start
    ("resolving", 0.05),
    ("joining", 0.1),
    ("loading", 0.2),
    ("measuring", 0.8),
    ("starting", 0.9),
)


@dataclass(frozen=True)
class ServiceConfig:
    """How the engine service runs; parsed once by `pollinate-engine run`."""

    data_dir: Path
    # "local": a new swarm on 127.0.0.1 with a demo server; "public": the Petals swarm; "private": yours.
    swarm: str = "local"
    # Multiaddrs of swarm peers (required for "private"; "public" uses the Petals bootstrap peers).
    initial_peers: tuple[str, ...] = ()
    # Model used when a request names none (hosting, plan, swarm); None: the demo model.
    default_model: str | None = None
    # Run the demo server for the demo model's blocks (local swarm only).
    demo_server: bool = True
    # Seconds a stopping host waits for running sessions when the request gives no grace period.
    grace_seconds: float = 30.0
    # Longest context the engine asks servers for (prompt + new tokens).
    max_context: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "initial_peers", tuple(self.initial_peers))
        if self.swarm not in SWARM_CHOICES:
            raise ValueError(f"swarm must be one of {', '.join(SWARM_CHOICES)}, got {self.swarm!r}")
        if self.swarm == "private" and not self.initial_peers:
            raise ValueError("--swarm private needs --initial-peers (multiaddrs of peers in your swarm)")
        if self.swarm == "local" and self.initial_peers:
            raise ValueError("--swarm local starts a new swarm: leave out --initial-peers")
        if self.grace_seconds < 0 or self.max_context < 1:
            raise ValueError("grace_seconds must be >= 0 and max_context >= 1")


@dataclass(frozen=True)
class ModelRef:
    """A model the engine can name: where its checkpoint is, and which DHT prefix its blocks use."""

    name: str  # the id used in the API
    source: str  # hub id or checkpoint folder
    dht_prefix: str
    num_blocks: int
    label: str
    demo: bool = False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pollinate")
    except PackageNotFoundError:
        return "0.1.0"


def _release_memory() -> None:
    """Give freed memory back to the OS (glibc keeps freed heap pages unless asked) and to the GPU."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the service ----------------------------------------------------------------------------------------


class EngineService:
    """The engine: DHT peer, swarm clients and block hosts, with a hosting state machine and counters.

    Cheap to construct; `start()` joins the swarm in the background (status `ready` turns true), `close()`
    stops everything. Every public method is thread-safe; blocking ones are called from worker threads.
    """

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.version = _version()
        self.pid = os.getpid()
        self.data_dir = config.data_dir
        self.started_at = time.time()
        self.dht = None  # client-mode peer: swarm views, model index, inference
        self._swarm_dht = None  # the local swarm's bootstrap peer (swarm "local" only)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[str, Any], None]] = []
        self._status: dict[str, Any] = dict(
            state="idle",
            progress=None,
            message=None,
            model=None,
            blocks=None,
            swarm=config.swarm,
            ready=False,
        )
        self._catalog: dict[str, ModelRef] = {}
        self._clients: dict[str, Any] = {}
        self._client_locks: dict[str, threading.Lock] = {}
        self._swarm_index: tuple[float, dict[str, Any]] = (0.0, {})
        self._demo_host = None
        self._host = None  # the user's BlockHost while hosting
        self._stop_requested = False
        self._served = {"tokens": 0, "requests": 0}  # from hosts that already stopped
        self._hosting_since: float | None = None
        self._hosting_seconds = 0.0
        self._generated = {"tokens": 0, "requests": 0}
        self._sessions = 0
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- events ----------------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        """`listener(kind, data)` is called (from any thread) with "status" and "stats" events."""
        self._listeners.append(listener)

    def _emit(self, kind: str, data: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, data)
            except Exception:
                logger.exception("event listener failed")

    def _set_status(self, **changes: Any) -> dict[str, Any]:
        with self._lock:
            if all(self._status.get(k) == v for k, v in changes.items()):
                return dict(self._status)
            self._status.update(changes)
            status = dict(self._status)
        self._emit("status", status)
        return status

    def status(self) -> dict[str, Any]:
        """The hosting state machine's position, as /api/status reports it."""
        with self._lock:
            return dict(self._status)

    def stats(self) -> dict[str, Any]:
        """Counters for /api/stats."""
        with self._lock:
            host = self._host
            hosting = self._hosting_seconds
            if self._hosting_since is not None:
                hosting += time.time() - self._hosting_since
            served = dict(self._served)
            generated = dict(self._generated)
        info = host.info() if host is not None else None
        return dict(
            tokens_served=served["tokens"] + (info.tokens_served if info else 0),
            requests_served=served["requests"] + (info.requests_served if info else 0),
            uptime_seconds=round(time.time() - self.started_at, 3),
            hosting_seconds=round(hosting, 3),
            sessions_active=info.sessions_open if info else 0,
            points=0.0,  # TODO(ledger issue): points earned from engine.ledger
            priority=BASE_PRIORITY,
            tokens_generated=generated["tokens"],
            requests_generated=generated["requests"],
        )

    def _stats_loop(self) -> None:
        """Push stats when they change, at most once a second (uptime alone is no change)."""
        last = None
        while not self._closing.wait(1.0):
            stats = self.stats()
            key = {k: v for k, v in stats.items() if k not in ("uptime_seconds", "hosting_seconds")}
            if key != last:
                last = key
                self._emit("stats", stats)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self, wait: bool = False) -> None:
        """Join the swarm (and start the demo server on a local swarm) in the background."""
        self._spawn(self._stats_loop, "pollinate-stats")
        if wait:
            self._boot()
        else:
            self._spawn(self._boot, "pollinate-boot")

    def _boot(self) -> None:
        from engine.swarm.dht_node import start_dht
        from engine.swarm.presets import get_preset

        try:
            preset = get_preset(self.config.swarm, self.config.initial_peers)
            local = self.config.swarm == "local"
            self._set_status(message="Joining the swarm")
            peers = preset.initial_peers
            if local:
                # The local swarm's first peer. The client gets a client-mode peer of its own: inference
                # streams opened through this (server-mode) bootstrap peer's daemon time out.
                self._swarm_dht = start_dht((), host="127.0.0.1", new_swarm=True)
                peers = tuple(str(a) for a in self._swarm_dht.get_visible_maddrs())
            dht = start_dht(peers, host="127.0.0.1" if local else "0.0.0.0", client_mode=True)
            with self._lock:
                self.dht = dht
            if self._closing.is_set():
                return
            demo = self._demo_ref()
            with self._lock:
                self._catalog[demo.name] = demo
            if local and self.config.demo_server:
                self._set_status(message="Starting the demo server")
                self._start_demo_host(demo)
            self._set_status(ready=True, message=None)
        except Exception as exc:
            logger.exception("the engine could not start")
            self._set_status(state="error", message=f"The engine could not start: {exc}", ready=False)

    def _demo_ref(self) -> ModelRef:
        from engine.demo import DEMO_MODEL_LABEL, DEMO_MODEL_NAME, DEMO_NUM_BLOCKS, ensure_demo_model
        from engine.models import family_for, load_config

        path = ensure_demo_model(self.data_dir)
        prefix = family_for(load_config(path)).default_dht_prefix(DEMO_MODEL_NAME)
        return ModelRef(DEMO_MODEL_NAME, str(path), prefix, DEMO_NUM_BLOCKS, DEMO_MODEL_LABEL, demo=True)

    def _peer_addresses(self) -> tuple[str, ...]:
        """Addresses a new peer of ours should bootstrap from: the engine's own DHT on a local swarm."""
        if self.config.swarm == "local":
            return tuple(str(a) for a in self._swarm_dht.get_visible_maddrs())
        from engine.swarm.presets import get_preset

        return get_preset(self.config.swarm, self.config.initial_peers).initial_peers

    def _start_demo_host(self, demo: ModelRef) -> None:
        from engine.server.block_host import BlockHost
        from engine.server.config import ServerConfig

        # Its own DHT peer: a server's records are keyed by its peer id, so two servers need two peers.
        config = ServerConfig(
            model=demo.source,
            start_block=0,
            end_block=demo.num_blocks,
            dht_prefix=demo.dht_prefix,
            initial_peers=self._peer_addresses(),
            host="127.0.0.1",
            device="cpu",
            throughput=1.0,
            public_name="pollinate demo server",
        )
        host = BlockHost(config)
        host.start()
        with self._lock:
            self._demo_host = host

    def close(self) -> None:
        """Stop hosting (no grace), the demo server, the clients and the DHT peer."""
        self._closing.set()
        with self._lock:
            host, self._host = self._host, None
            demo, self._demo_host = self._demo_host, None
            clients, self._clients = list(self._clients.values()), {}
        for stopper in [*(h.stop for h in (host, demo) if h is not None), *(c.close for c in clients)]:
            try:
                stopper()
            except Exception:
                logger.warning("error while closing the engine", exc_info=True)
        for dht in (self.dht, self._swarm_dht):
            if dht is not None:
                with contextlib.suppress(Exception):
                    dht.shutdown()
        self.dht = self._swarm_dht = None

    def _require_ready(self) -> None:
        status = self.status()
        if not status["ready"]:
            detail = status["message"] or "starting"
            raise SwarmUnavailableError(f"The engine is not ready yet ({detail}); try again in a moment.")

    # ---- models ----------------------------------------------------------------------------------------

    def _swarm_models(self) -> dict[str, Any]:
        """The swarm's model index (dht_prefix -> ModelInfo), cached for a few seconds."""
        from engine.swarm.discovery import list_models

        fetched, models = self._swarm_index
        if time.monotonic() - fetched > SWARM_INDEX_TTL and self.dht is not None:
            try:
                models = list_models(self.dht)
            except Exception as exc:
                logger.warning("could not read the swarm's model index: %s", exc)
            self._swarm_index = (time.monotonic(), models)
        return models

    @staticmethod
    def _name_for(dht_prefix: str, repository: str | None) -> str:
        if repository:
            return repository.removeprefix("https://huggingface.co/").strip("/") or dht_prefix
        return dht_prefix

    def _find_model(self, name: str | None) -> ModelRef:
        """The model called `name` (None: the default model); raises ModelNotFoundError."""
        from engine.models import family_for, load_config, resolve_checkpoint

        self._require_ready()
        name = name or self.config.default_model or self._demo_name()
        with self._lock:
            for ref in self._catalog.values():
                if name in (ref.name, ref.dht_prefix):
                    return ref
        for prefix, info in self._swarm_models().items():
            # Without a repository (hosted from a private folder) there is no tokenizer to chat with.
            if info.repository and name in (prefix, self._name_for(prefix, info.repository)):
                source = self._name_for(prefix, info.repository)
                ref = ModelRef(source, source, prefix, int(info.num_blocks), source)
                with self._lock:
                    return self._catalog.setdefault(ref.name, ref)
        try:
            config = load_config(resolve_checkpoint(name))
            prefix = family_for(config).default_dht_prefix(name)
        except Exception as exc:  # hub and network errors come in many types; all mean "cannot use it"
            raise ModelNotFoundError(
                f"Unknown model {name!r}: {exc}. GET /v1/models lists the models the swarm serves."
            ) from exc
        ref = ModelRef(name, name, prefix, int(config.num_hidden_layers), name)
        with self._lock:
            return self._catalog.setdefault(ref.name, ref)

    def _demo_name(self) -> str:
        from engine.demo import DEMO_MODEL_NAME

        return DEMO_MODEL_NAME

    def _snapshot(self, ref: ModelRef):
        from engine.swarm.discovery import fetch_snapshot

        return fetch_snapshot(self.dht, ref.dht_prefix, ref.num_blocks)

    def list_models(self) -> list[dict[str, Any]]:
        """/v1/models: the demo model and every model the swarm can serve fully (one entry per prefix)."""
        self._require_ready()
        with self._lock:
            by_prefix = {ref.dht_prefix: ref for ref in self._catalog.values()}
        for prefix, info in self._swarm_models().items():
            if info.num_blocks and info.repository and prefix not in by_prefix:
                name = self._name_for(prefix, info.repository)
                by_prefix[prefix] = ModelRef(name, name, prefix, int(info.num_blocks), name)
        entries = []
        for ref in sorted(by_prefix.values(), key=lambda r: (not r.demo, r.name)):
            missing = self._snapshot(ref).missing_blocks()
            if ref.demo or not missing:
                facts = dict(
                    label=ref.label, demo=ref.demo, num_blocks=ref.num_blocks, missing_blocks=missing
                )
                entries.append(dict(id=ref.name, created=0, owned_by="pollinate-swarm", pollinate=facts))
        return entries

    def swarm_info(self, model: str | None) -> dict[str, Any]:
        """/api/swarm: block coverage and servers of one model."""
        ref = self._find_model(model)
        snapshot = self._snapshot(ref)
        from engine.swarm.records import ServerState

        coverage = snapshot.coverage()
        throughputs = snapshot.block_throughputs(ServerState.ONLINE)
        servers = [
            dict(
                peer_id=span.peer_id,
                public_name=span.server_info.public_name,
                start_block=span.start,
                end_block=span.end,
                state=ServerState(span.state).name.lower(),
                throughput=float(span.throughput),
                version=span.server_info.version,
            )
            for span in snapshot.spans(ServerState.OFFLINE)
        ]
        return dict(
            model=ref.name,
            dht_prefix=ref.dht_prefix,
            total_blocks=ref.num_blocks,
            blocks=[
                dict(index=i, servers=coverage[i], throughput=float(throughputs[i]))
                for i in range(ref.num_blocks)
            ],
            servers=servers,
            missing_blocks=snapshot.missing_blocks(),
        )

    # ---- hosting ---------------------------------------------------------------------------------------

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
                # Tiny random checkpoints are for demos and tests: measuring them would only cost time.
                throughput=1.0 if is_tiny_checkpoint(ref.source) else None,
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
            free = int(placement.free_memory_bytes(device) * (memory_fraction or 1.0))
            throughputs = None if span else self._snapshot(ref).block_throughputs()
            plan = placement.plan_span(
                config,
                model_config,
                free_bytes=free,
                dtype=dtype,
                quant=quant_name,
                block_throughputs=throughputs,
            )
        except placement.PlacementError as exc:
            raise InvalidRequestError(str(exc)) from exc
        config = config.replace(start_block=plan.start, end_block=plan.end)
        facts = dict(
            model=ref.name,
            dht_prefix=ref.dht_prefix,
            start_block=plan.start,
            end_block=plan.end,
            num_blocks=plan.num_blocks,
            total_blocks=ref.num_blocks,
            quant=quant_name,
            dtype=str(dtype).removeprefix("torch."),
            device=device.type,
            weights_bytes=int(plan.weights_bytes),
            cache_bytes=int(plan.cache_bytes),
            total_bytes=int(plan.weights_bytes + plan.cache_bytes),
        )
        return config, facts

    def hosting_plan(self, model: str | None) -> dict[str, Any]:
        """/api/hosting/plan: which blocks hosting `model` would take and the memory it would use."""
        return self._plan(self._find_model(model), None, None, None)[1]

    def start_hosting(self, model=None, blocks=None, quant=None, memory_fraction=None) -> dict[str, Any]:
        """Start sharing blocks; returns at once with state "loading" (progress follows in events)."""
        from engine.server.block_host import BlockHost

        with self._lock:
            if self._status["state"] not in ("idle", "error"):
                raise WrongStateError(
                    f"Hosting is already {self._status['state']}; stop it before starting again."
                )
        ref = self._find_model(model)
        config, facts = self._plan(ref, blocks, quant, memory_fraction)
        with self._lock:
            if self._status["state"] not in ("idle", "error"):
                raise WrongStateError(f"Hosting is already {self._status['state']}.")
            host = self._host = BlockHost(config)
            self._stop_requested = False
        status = self._set_status(
            state="loading",
            progress=0.0,
            message="Preparing",
            model=ref.name,
            blocks=[facts["start_block"], facts["end_block"]],
        )
        self._spawn(lambda: self._run_host(host), "pollinate-hosting")
        return status

    def _run_host(self, host) -> None:
        done = threading.Event()

        def watch_progress() -> None:  # BlockHost reports its step as a message; map it to a fraction
            while not done.wait(0.2):
                message = host.message or ""
                progress = next((p for prefix, p in HOSTING_PROGRESS if message.startswith(prefix)), None)
                if progress is not None and self.status()["state"] == "loading":
                    self._set_status(progress=progress, message=message[:1].upper() + message[1:])

        self._spawn(watch_progress, "pollinate-hosting-progress")
        try:
            host.start()
        except Exception as exc:
            done.set()
            logger.warning("hosting failed to start: %s", exc)
            with self._lock:
                self._host = None
            _release_memory()
            self._set_status(state="error", progress=None, message=f"Hosting failed: {exc}", blocks=None)
            return
        done.set()
        with self._lock:
            self._hosting_since = time.time()
            stop_now = self._stop_requested
        self._set_status(state="serving", progress=None, message=None)
        if stop_now:  # stop was asked for while loading
            self._drain(host, 0.0)

    def stop_hosting(self, grace_seconds: float | None = None) -> dict[str, Any]:
        """Stop sharing: announce OFFLINE, let sessions finish within the grace period, free memory."""
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        with self._lock:
            state, host = self._status["state"], self._host
            if state == "error":  # nothing runs: acknowledge the error and go back to idle
                self._status.update(state="idle", progress=None, message=None, model=None, blocks=None)
            elif state in ("idle", "draining"):
                raise WrongStateError(f"Hosting is {state}; there is nothing to stop.")
            elif state == "loading":
                self._stop_requested = True
        if state == "error":
            status = self.status()
            self._emit("status", status)
            return status
        status = self._set_status(state="draining", progress=None, message="Letting running sessions finish")
        if state == "serving":
            self._spawn(lambda: self._drain(host, grace), "pollinate-draining")
        return status

    def _drain(self, host, grace: float) -> None:
        if self.status()["state"] != "draining":
            self._set_status(state="draining", progress=None, message="Letting running sessions finish")
        # The counters live in the host's handler, which stop() drops: keep a reference to read them after
        # the draining sessions finished. TODO(server): let BlockHost.info() keep its counters after stop().
        handler_stats = getattr(getattr(host, "_handler", None), "stats", None)
        info = handler_stats or host.info()
        try:
            host.stop(grace_seconds=grace)
        except Exception:
            logger.warning("error while stopping the block host", exc_info=True)
        tokens = getattr(info, "tokens", getattr(info, "tokens_served", 0))
        requests = getattr(info, "requests", getattr(info, "requests_served", 0))
        with self._lock:
            self._served["tokens"] += tokens
            self._served["requests"] += requests
            if self._hosting_since is not None:
                self._hosting_seconds += time.time() - self._hosting_since
            self._hosting_since = None
            if self._host is host:
                self._host = None
        del host, info, handler_stats
        _release_memory()
        self._set_status(state="idle", progress=None, message=None, model=None, blocks=None)

    # ---- generation ------------------------------------------------------------------------------------

    def _client(self, ref: ModelRef):
        """The swarm client of `ref` (embeddings, head, tokenizer, swarm view), made once per model."""
        from engine.client.model import DistributedModelForCausalLM

        with self._lock:
            lock = self._client_locks.setdefault(ref.name, threading.Lock())
        with lock:
            with self._lock:
                client = self._clients.get(ref.name)
            if client is None:
                client = DistributedModelForCausalLM.from_pretrained(
                    ref.source, dht=self.dht, dht_prefix=ref.dht_prefix
                )
                with self._lock:
                    self._clients[ref.name] = client
            return client

    def _prompt_ids(self, tokenizer, request: GenerationRequest) -> list[int]:
        if request.messages is None:
            return list(tokenizer(request.prompt)["input_ids"])
        messages = [{"role": role, "content": content} for role, content in request.messages]
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # templates may reject role orders (e.g. two user turns in a row)
                raise InvalidRequestError(
                    f"The model's chat template rejected these messages: {exc}"
                ) from exc
        else:  # a base model without a template: a plain transcript that ends where the reply begins
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        # The template already holds any special tokens the model expects (such as BOS).
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[GenerationEvent]:
        """Run one completion through the swarm; yields Started, TextDeltas, then Finished.

        Blocking (run it in a worker thread). Closing the iterator, or setting `cancel`, ends the inference
        session, so the servers free its cache.
        """
        import torch

        from engine.client.routing import MissingBlocksError
        from engine.client.sampling import SamplingParams

        ref = self._find_model(request.model)
        missing = self._snapshot(ref).missing_blocks()
        if missing:
            raise _unavailable(ref, missing)
        client = self._client(ref)
        tokenizer = client.tokenizer
        ids = self._prompt_ids(tokenizer, request)
        context = min(
            self.config.max_context, getattr(client.config, "max_position_embeddings", 2048) or 2048
        )
        if len(ids) >= context:
            raise InvalidRequestError(
                f"The prompt has {len(ids)} tokens; {ref.name} takes at most {context - 1}."
            )
        max_new = request.max_tokens or context - len(ids)
        if len(ids) + max_new > context:
            raise InvalidRequestError(
                f"The prompt ({len(ids)} tokens) plus max_tokens ({max_new}) exceeds the context of "
                f"{context} tokens; ask for at most {context - len(ids)} new tokens."
            )
        params = SamplingParams(
            max_new_tokens=max_new,
            do_sample=request.temperature > 0,
            temperature=request.temperature if request.temperature > 0 else 1.0,
            top_p=request.top_p if request.top_p is not None and request.top_p < 1.0 else None,
            seed=request.seed,
            eos_token_id=_eos_ids(client.config, tokenizer),
            pad_token_id=getattr(client.config, "pad_token_id", None),
        )
        text = TextHoldback(request.stop)
        decoder = IncrementalDecoder(tokenizer)
        new_ids: list[int] = []
        produced, reason = 0, "length"
        with self._lock:
            self._sessions += 1
        try:
            with client.inference_session(max_length=len(ids) + max_new) as session:
                steps = client.generate_stream(torch.tensor([ids]), params, session=session)
                try:
                    started = False
                    for step in steps:
                        if not started:  # the prefill went through: from here on errors are in-band
                            started = True
                            yield Started(len(ids))
                        produced += 1
                        token = int(step.tokens[0])
                        if token in params.eos_ids:
                            reason = "stop"
                            break
                        new_ids.append(token)
                        delta, stopped = text.feed(decoder.step(new_ids))
                        if delta:
                            yield TextDelta(delta)
                        if stopped:
                            reason = "stop"
                            break
                        if cancel.is_set():
                            return
                    if not started:
                        yield Started(len(ids))
                finally:
                    steps.close()
            tail = text.feed(decoder.finish(new_ids))[0] + text.flush()
            if tail:
                yield TextDelta(tail)
            with self._lock:
                self._generated["tokens"] += produced
                self._generated["requests"] += 1
            yield Finished(reason, len(ids), produced)
        except MissingBlocksError as exc:
            raise _unavailable(ref, exc.missing_blocks) from exc
        finally:
            with self._lock:
                self._sessions -= 1


def _unavailable(ref: ModelRef, missing) -> SwarmUnavailableError:
    shown = ", ".join(str(b) for b in missing)
    return SwarmUnavailableError(
        f"The swarm cannot serve {ref.name}: block{'s' if len(missing) > 1 else ''} {shown} "
        f"{'have' if len(missing) > 1 else 'has'} no server. "
        "Wait for servers to join, or host them yourself.",
        list(missing),
    )


def _eos_ids(model_config, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (getattr(model_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return tuple(ids)


class IncrementalDecoder:
    """New text as tokens arrive; a token that ends in half a character waits for the rest (or the end)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = ""

    def _new(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed earlier text (rare): send only what is new
            same = next(
                (i for i, (a, b) in enumerate(zip(text, self.sent, strict=False)) if a != b),
                min(len(text), len(self.sent)),
            )
            text, self.sent = text[same:], text
            return text
        new, self.sent = text[len(self.sent) :], text
        return new

    def step(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._new(text)

    def finish(self, ids: list[int]) -> str:
        """Whatever is still unsent when generation ends (such as a final half character)."""
        return self._new(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


class TextHoldback:
    """Streams text while watching for stop sequences: text that could begin a stop is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self._done = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was reached)."""
        if self._done:
            return "", True
        self._pending += piece
        if not self.stops:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending, self._done = self._pending[: min(hits)], "", True
            return out, True
        keep = 0  # the longest tail of the pending text that is a prefix of some stop sequence
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:length]):
                    keep = length
                    break
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out, False

    def flush(self) -> str:
        """What is still held back when generation ends without reaching a stop."""
        out, self._pending = ("" if self._done else self._pending), ""
        return out
