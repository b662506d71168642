"""EngineService: the long-lived engine behind `pollinate-engine run` (DHT peer, swarm client, block hosts).

It owns the lifecycle of its parts, the hosting state machine (idle -> loading -> serving -> draining ->
idle, or error; engine/service/hosting.py; serving -> draining -> paused -> serving or loading:
engine/service/pausing.py), counters for /api/stats and a fan-out of status/stats events.
It knows nothing of HTTP: failures are ServiceErrors with a `type` that engine.api maps to status codes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from contract import HostingState, Stats
from engine.service.config import ModelRef, ServiceConfig
from engine.service.core import ServiceCore
from engine.service.generation import Generation
from engine.service.hosting import Hosting
from engine.service.lifetime import FIELDS as LIFETIME_FIELDS
from engine.service.lifetime import LifetimeCounters
from engine.service.models import Catalog
from engine.service.politeness import Politeness
from engine.service.text import GenerationEvent, GenerationRequest

logger = logging.getLogger(__name__)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pollinate")
    except PackageNotFoundError:
        return "0.1.0"


class EngineService:
    """The engine: DHT peer, swarm clients and block hosts, with a hosting state machine and counters.

    Composed of parts that share only a ServiceCore (config, lock, status and events, swarm peers, ledger):
    the Catalog (models, swarm views), Hosting (the user's block server, pauses included), Generation
    (completions) and Politeness (policy and monitor). This class builds them, owns their lifecycle and is
    the surface the API calls. Cheap to construct; `start()` joins the swarm in the background (status
    `ready` turns true), `close()` stops everything. Every public method is thread-safe; blocking ones are
    called from worker threads.
    """

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.version = _version()
        self.pid = os.getpid()
        self.data_dir = config.data_dir
        self.started_at = time.time()
        self.core = ServiceCore(config)
        self.catalog = Catalog(self.core)
        self.hosting = Hosting(self.core, self.catalog)
        self.generation = Generation(self.core, self.catalog)
        self.politeness = Politeness(self.core, self)
        self.lifetime = LifetimeCounters(config.data_dir)  # totals over every run, kept in the data dir
        self._demo_hosts: list = []  # the local swarm's demo servers

    # ---- the surface the API (and the politeness monitor) calls -----------------------------------------

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        """`listener(kind, data)` is called (from any thread) with "status" and "stats" events."""
        self.core.add_listener(listener)

    def status(self) -> dict[str, Any]:
        """The hosting state machine's position, as /api/status reports it (a contract.Status)."""
        return self.core.status()

    def list_models(self) -> list[dict[str, Any]]:
        return self.catalog.list_models()

    def swarm_info(self, model: str | None) -> dict[str, Any]:
        return self.catalog.swarm_info(model)

    def hosting_plan(self, model: str | None, quant: str | None = None, memory_fraction: float | None = None):
        return self.hosting.hosting_plan(model, quant, memory_fraction)

    def start_hosting(self, model=None, blocks=None, quant=None, memory_fraction=None) -> dict[str, Any]:
        return self.hosting.start_hosting(model, blocks, quant, memory_fraction)

    def stop_hosting(self, grace_seconds: float | None = None) -> dict[str, Any]:
        return self.hosting.stop_hosting(grace_seconds)

    def set_memory_share(self, memory_fraction: float) -> dict[str, Any]:
        return self.hosting.set_memory_share(memory_fraction)

    def pause_sharing(self, *args, **kwargs) -> dict[str, Any]:
        return self.hosting.pause_sharing(*args, **kwargs)

    def pause_for(self, *args, **kwargs) -> dict[str, Any]:
        return self.hosting.pause_for(*args, **kwargs)

    def resume_sharing(self, *args, **kwargs) -> dict[str, Any]:
        return self.hosting.resume_sharing(*args, **kwargs)

    def release_paused(self) -> None:
        self.hosting.release_paused()

    @property
    def throttle(self) -> tuple[int | None, float]:
        return self.hosting.throttle

    def set_throttle(self, max_sessions: int | None, compute_share: float) -> None:
        self.hosting.set_throttle(max_sessions, compute_share)

    def hosting_device(self) -> str | None:
        return self.hosting.hosting_device()

    def policy(self) -> dict[str, Any]:
        return self.politeness.policy()

    def set_policy(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.politeness.set_policy(data)

    @property
    def monitor(self):
        return self.politeness.monitor

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[GenerationEvent]:
        return self.generation.generate(request, cancel)

    @property
    def dht(self):
        return self.core.dht

    @property
    def ledger(self):
        return self.core.ledger

    def stats(self) -> dict[str, Any]:
        """Counters for /api/stats (a contract.Stats)."""
        run, info = self.hosting.counters()
        generated = self.generation.counters()
        ledger = self.core.ledger
        summary = ledger.summary() if ledger is not None else dict(points=0.0, priority=1.0)
        lifetime = self.lifetime.totals(run)
        return Stats(
            **run,
            uptime_seconds=round(time.time() - self.started_at, 3),
            sessions_active=info.sessions_open if info else 0,
            points=float(summary["points"]),
            priority=float(summary["priority"]),
            tokens_generated=generated["tokens"],
            requests_generated=generated["requests"],
            lifetime_tokens_served=int(lifetime["tokens_served"]),
            lifetime_requests_served=int(lifetime["requests_served"]),
            lifetime_hosting_seconds=round(lifetime["hosting_seconds"], 3),
        ).to_dict()

    def _save_lifetime(self) -> None:
        stats = self.stats()
        self.lifetime.save({name: stats[name] for name in LIFETIME_FIELDS})

    def _stats_loop(self) -> None:
        """Push stats when they change, at most once a second (uptime alone is no change)."""
        last = None
        while not self.core.closing.wait(1.0):
            stats = self.stats()
            self.lifetime.save({name: stats[name] for name in LIFETIME_FIELDS})
            key = {k: v for k, v in stats.items() if k not in ("uptime_seconds", "hosting_seconds")}
            if key != last:
                last = key
                self.core.emit("stats", stats)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self, wait: bool = False) -> None:
        """Join the swarm (and start the demo server on a local swarm) in the background."""
        self.core.spawn(self._stats_loop, "pollinate-stats")
        self.politeness.start()
        if wait:
            self._boot()
        else:
            self.core.spawn(self._boot, "pollinate-boot")

    def _boot(self) -> None:
        from engine.swarm.dht_node import start_dht
        from engine.swarm.presets import get_preset

        try:
            local = self.config.swarm == "local"
            self.core.set_status(message="Joining the swarm")
            if local:
                # The local swarm's first peer, which the client also uses (each server has a peer of its own:
                # a server's records are keyed by its peer id).
                dht = self.core.swarm_dht = start_dht((), host="127.0.0.1", new_swarm=True)
            elif self.creates_private_swarm:
                # A new private swarm: our peer is its first, reachable one; others join by our invite.
                dht = self.core.swarm_dht = start_dht((), host="0.0.0.0", new_swarm=True)
            else:
                peers = get_preset(self.config.swarm, self.config.initial_peers).initial_peers
                dht = start_dht(peers, host="0.0.0.0", client_mode=True)
            with self.core.lock:
                self.core.dht = dht
            self._set_invite()
            if self.core.closing.is_set():
                return
            self._open_ledger(dht.peer_id.to_base58())
            demo = self._optional_demo_ref(required=local)
            if demo is not None:
                self.catalog.add(demo)
            if demo is not None and local and self.config.demo_server:
                self._start_demo_hosts(demo)
            self.core.set_status(ready=True, message=None, progress=None)
        except Exception as exc:
            logger.exception("the engine could not start")
            self.core.set_status(state=HostingState.ERROR, message=self._boot_failure(exc), ready=False)

    def _boot_failure(self, exc: Exception) -> str:
        """One sentence a person can act on (the details, addresses included, are in the log)."""
        from engine.models.errors import ModelError
        from engine.smollm2 import SmolLM2MissingError
        from engine.swarm.dht_node import SwarmConnectionError

        if isinstance(exc, SmolLM2MissingError):
            return str(exc)  # says which package is missing and how to install it
        if isinstance(exc, ModelError):
            return f"The engine could not prepare the demo model: {exc}"
        if isinstance(exc, SwarmConnectionError) and "could not reach" in str(exc):
            if self.config.swarm == "private":
                return (
                    "Cannot reach your private swarm: none of its peers answered. Check the peers in "
                    "Settings and the internet connection, then Retry."
                )
            return (
                f"Cannot reach the {self.config.swarm} swarm: none of its entry peers answered. "
                "Check the internet connection, then Retry."
            )
        return f"The engine could not join the swarm: {exc}"

    def _open_ledger(self, peer_id: str) -> None:
        from engine.ledger import Ledger, default_ledger_path

        ledger = Ledger.open(default_ledger_path(self.data_dir))
        ledger.start_autosave()
        ledger.set_self(peer_id)  # our own client's requests earn our servers no points
        with self.core.lock:
            self.core.ledger = ledger

    def _optional_demo_ref(self, required: bool) -> ModelRef | None:
        """The demo model; off the local swarm a demo that cannot be prepared is left out, not fatal."""
        from engine.models.errors import ModelNotFoundError

        try:
            return self._demo_ref()
        except ModelNotFoundError as exc:
            if required:
                raise
            logger.warning("the demo model is not available (the swarm's models still are): %s", exc)
            self.core.set_status(progress=None)
            return None

    def _demo_ref(self) -> ModelRef:
        """The local swarm's model, prepared on first use (SmolLM2: ~20 s once, with progress in status)."""
        if self.config.demo_model == "tiny":
            from engine.demo import DEMO_MODEL_LABEL, DEMO_MODEL_NAME, DEMO_NUM_BLOCKS, ensure_demo_model
            from engine.models import family_for, load_config

            path = ensure_demo_model(self.data_dir)
            prefix = family_for(load_config(path)).default_dht_prefix(DEMO_MODEL_NAME)
            return ModelRef(
                DEMO_MODEL_NAME,
                str(path),
                prefix,
                DEMO_NUM_BLOCKS,
                DEMO_MODEL_LABEL,
                demo=True,
                random_weights=True,
            )
        from engine import smollm2

        name = smollm2.SMOLLM2_MODEL_NAME

        def progress(fraction: float, message: str) -> None:
            self.core.set_status(
                progress=round(fraction, 3),
                message=f"Preparing the demo model {name} (first start only): {message}",
            )

        self.core.set_status(message=f"Checking the demo model {smollm2.SMOLLM2_MODEL_NAME}")
        path = smollm2.ensure_smollm2(self.data_dir / "models", progress=progress)
        self.core.set_status(progress=None)
        return ModelRef(
            smollm2.SMOLLM2_MODEL_NAME,
            str(path),
            smollm2.SMOLLM2_DHT_PREFIX,
            smollm2.SMOLLM2_NUM_BLOCKS,
            smollm2.SMOLLM2_MODEL_LABEL,
            demo=True,
        )

    @property
    def creates_private_swarm(self) -> bool:
        """A private swarm without peers to join: this engine starts it (and invites others)."""
        return self.config.swarm == "private" and not self.config.initial_peers

    def _set_invite(self) -> None:
        """Put the addresses others can join through, and the invite made of them, into the status."""
        from contract.invites import InviteError, make_invite

        addresses: tuple[str, ...] = ()
        if self.config.swarm == "private" or self.config.swarm == "local":
            addresses = self.core.peer_addresses()  # local: this machine only (127.0.0.1)
        try:
            invite = make_invite(addresses) if addresses else None
        except InviteError as exc:
            logger.warning("no invite: %s", exc)
            invite = None
        self.core.set_status(addresses=list(addresses), invite=invite)

    def _start_demo_hosts(self, demo: ModelRef) -> None:
        """Start the demo servers, each on a span of the demo model (two for a real pipeline)."""
        from engine.demo import demo_spans
        from engine.server.block_host import BlockHost
        from engine.server.config import ServerConfig

        spans = demo_spans(demo.num_blocks, 1 if demo.random_weights else 2)
        for number, (start, end) in enumerate(spans, 1):
            self.core.set_status(
                message=f"Starting demo server {number} of {len(spans)} (blocks {start}:{end})"
            )
            # Its own DHT peer: a server's records are keyed by its peer id, so two servers need two peers.
            config = ServerConfig(
                model=demo.source,
                start_block=start,
                end_block=end,
                dht_prefix=demo.dht_prefix,
                initial_peers=self.core.peer_addresses(),
                host="127.0.0.1",
                device="cpu",
                throughput=1.0,
                public_name=f"pollinate demo server {number}",
            )
            host = BlockHost(config, **self.core.host_hooks())
            with self.core.lock:
                if self.core.closing.is_set():
                    return
                self._demo_hosts.append(host)
            host.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop hosting (no grace), the demo server, the clients, the ledger and the DHT peers.

        The parts stop in parallel (each DHT peer is a process of its own that takes a moment to end), so
        an idle engine stops in a few seconds.
        """
        self.core.closing.set()
        self._save_lifetime()  # while the host's counters are still in stats()
        self.politeness.stop()
        host, auditor = self.hosting.take_for_close()
        clients = self.generation.take_clients()
        with self.core.lock:
            demos, self._demo_hosts = self._demo_hosts, []
        if auditor is not None:
            _run_all([auditor.stop], timeout)
        hosts = [h for h in (host, *demos) if h is not None]
        _run_all([*(h.stop for h in hosts), *(c.close for c in clients)], timeout)
        core = self.core
        dhts = [d for d in {id(d): d for d in (core.dht, core.swarm_dht) if d is not None}.values()]
        _run_all([d.shutdown for d in dhts], timeout)
        core.dht = core.swarm_dht = None
        if core.ledger is not None:
            _run_all([core.ledger.close], timeout)


def _run_all(actions: list[Callable[[], Any]], timeout: float) -> None:
    """Run `actions` in parallel threads and wait up to `timeout` seconds for all; failures are logged."""

    def guarded(action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception:
            logger.warning("error while closing the engine", exc_info=True)

    threads = [
        threading.Thread(target=guarded, args=(a,), name="pollinate-close", daemon=True) for a in actions
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
