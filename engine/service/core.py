"""ServiceCore: what the parts of the engine service share, and nothing else.

The configuration, one lock, the status record and its events, the swarm peers, the ledger and the worker
threads. The parts (Catalog, Hosting, Generation) each receive the core and the parts they use, and keep
their own state to themselves; EngineService (engine/service/engine.py) builds them and owns their lifecycle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from contract import HostingState, Status, Swarm
from engine.service.config import ServiceConfig
from engine.service.errors import EngineNotReadyError

logger = logging.getLogger(__name__)


class ServiceCore:
    """Shared by the service's parts: configuration, lock, status and events, swarm peers, ledger, threads."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.data_dir = config.data_dir
        self.lock = threading.RLock()
        self.closing = threading.Event()
        # The hosting state machine's position (contract.Status); replaced, never mutated, under `lock`.
        self.status_record = Status(swarm=Swarm(config.swarm))
        self.dht = None  # our peer for swarm views, model index, inference (client mode unless local)
        self.swarm_dht = None  # the local swarm's bootstrap peer (swarm "local" only)
        self._swarm_addresses: tuple[str, ...] | None = None  # swarm_dht's addresses, once known
        self.ledger = None  # engine.ledger.Ledger once started: points, priority, observed contributions
        self._listeners: list[Callable[[str, Any], None]] = []
        self._threads: list[threading.Thread] = []

    # ---- events

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        """`listener(kind, data)` is called (from any thread) with "status" and "stats" events."""
        self._listeners.append(listener)

    def emit(self, kind: str, data: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, data)
            except Exception:
                logger.exception("event listener failed")

    def set_status(self, **changes: Any) -> dict[str, Any]:
        """Change the status record; an actual change is sent to the listeners. Returns the status."""
        with self.lock:
            if all(getattr(self.status_record, k) == v for k, v in changes.items()):
                return self.status_record.to_dict()
            self.status_record = self.status_record.replace(**changes)
            status = self.status_record.to_dict()
        self.emit("status", status)
        return status

    def status(self) -> dict[str, Any]:
        """The status as /api/status reports it."""
        with self.lock:
            return self.status_record.to_dict()

    def require_ready(self) -> None:
        status = self.status()
        if not status["ready"] and status["state"] == HostingState.ERROR:
            # The join failed and the engine does not try again by itself: waiting would never help.
            reason = status["message"] or "The engine could not join the swarm."
            raise EngineNotReadyError(f"{reason} (Restart the engine to try again.)")
        if not status["ready"]:
            detail = status["message"] or "starting"
            raise EngineNotReadyError(f"The engine is still starting ({detail}); try again in a moment.")

    # ---- threads and swarm

    def spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def peer_addresses(self) -> tuple[str, ...]:
        """Addresses a new peer of ours should bootstrap from: the engine's own DHT on a local swarm or a
        private swarm it created, else the swarm's initial peers."""
        if self.swarm_dht is not None:
            # Asked once: the peer's addresses do not change, and asking its process on every plan or start
            # would wait on it whenever it is busy.
            if self._swarm_addresses is None:
                self._swarm_addresses = tuple(str(a) for a in self.swarm_dht.get_visible_maddrs())
            return self._swarm_addresses
        from engine.swarm.presets import get_preset

        return get_preset(self.config.swarm, self.config.initial_peers).initial_peers

    def host_hooks(self) -> dict[str, Any]:
        """Keyword arguments that tie a BlockHost to the ledger (priority, usage and points callbacks)."""
        return self.ledger.host_hooks() if self.ledger is not None else {}
