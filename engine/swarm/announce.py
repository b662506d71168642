"""Announcing hosted blocks (and the model they belong to) to the DHT, once or periodically.

Records expire on their own, so a server that dies without saying goodbye disappears after ``expiration``
seconds; a server that stops cleanly announces OFFLINE first so clients drop it at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.utils import get_dht_time
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS

from engine.swarm.keys import MODELS_INDEX_KEY, PROTOCOL_VERSION, block_uids, is_private_prefix
from engine.swarm.records import ModelInfo, ServerInfo, ServerState

logger = get_logger(__name__)

DEFAULT_UPDATE_PERIOD = 60.0  # Petals' --update_period default, in seconds


def default_expiration(update_period: float) -> float:
    """Petals' rule: records live two update periods, but never less than the DHT's allowed clock skew."""
    return max(2 * update_period, MAX_DHT_TIME_DISCREPANCY_SECONDS)


async def _store_blocks(
    dht: DHT, node: Any, uids: list[str], subkey: str, value: tuple, expiration_time: float
):
    # Runs inside the DHT process; takes plain data only, since arguments cross a process boundary.
    num_workers = len(uids) if dht.num_workers is None else min(len(uids), dht.num_workers)
    return await node.store_many(
        keys=uids,
        subkeys=[subkey] * len(uids),
        values=[value] * len(uids),
        expiration_time=expiration_time,
        num_workers=max(num_workers, 1),
    )


def declare_blocks(
    dht: DHT, uids: Sequence[str], server_info: ServerInfo, expiration_time: float
) -> dict[str, bool]:
    """Store ``server_info`` under each block uid with this peer's id as subkey; returns success per uid.

    ``expiration_time`` is an absolute DHT time (``get_dht_time() + seconds``), as in hivemind.
    """
    uids = list(uids)
    if not uids:
        return {}
    coroutine = partial(
        _store_blocks,
        uids=uids,
        subkey=dht.peer_id.to_base58(),
        value=server_info.to_tuple(),
        expiration_time=expiration_time,
    )
    stored = dht.run_coroutine(coroutine)
    # hivemind keys the result by (key, subkey) when a subkey is used; callers want it by uid.
    return {(key[0] if isinstance(key, tuple) else key): ok for key, ok in stored.items()}


def declare_model(dht: DHT, dht_prefix: str, model_info: ModelInfo, expiration_time: float) -> bool:
    """Add the model to the ``_petals.models`` index (subkey = dht_prefix), as Petals servers do."""
    return bool(
        dht.store(MODELS_INDEX_KEY, model_info.to_dict(), expiration_time=expiration_time, subkey=dht_prefix)
    )


def _dht_alive(dht) -> bool:
    try:
        return bool(dht.is_alive())
    except (AssertionError, ValueError, AttributeError):  # not our child, or closed: cannot tell, assume so
        return True


class Announcer:
    """Keeps a span of blocks announced: re-declares every ``update_period`` seconds from a daemon thread.

    ``fields_provider`` (optional) is called before each announcement and returns fields to refresh, such as
    ``cache_tokens_left`` or ``next_pings``; it runs on the announcer thread. The constructor does nothing
    but store its arguments; ``start()`` begins announcing, ``stop()`` announces OFFLINE and ends.
    """

    def __init__(
        self,
        dht: DHT,
        dht_prefix: str,
        start_block: int,
        end_block: int,
        server_info: ServerInfo,
        model_info: ModelInfo | None = None,
        *,
        update_period: float = DEFAULT_UPDATE_PERIOD,
        expiration: float | None = None,
        fields_provider: Callable[[], dict[str, Any]] | None = None,
    ):
        if update_period <= 0:
            raise ValueError(f"update_period must be positive, got {update_period}")
        self.dht, self.dht_prefix, self.model_info = dht, dht_prefix, model_info
        self.uids = block_uids(dht_prefix, start_block, end_block)
        if not self.uids:
            raise ValueError("an Announcer needs at least one block")
        self.update_period = update_period
        self.expiration = default_expiration(update_period) if expiration is None else expiration
        self.fields_provider = fields_provider
        protocol = server_info.pollinate_protocol or PROTOCOL_VERSION
        self._info = server_info.replace(
            start_block=start_block, end_block=end_block, pollinate_protocol=protocol
        )
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._done = threading.Condition()
        self._requested = self._completed = 0  # announcement rounds asked for / finished
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def server_info(self) -> ServerInfo:
        """The record as last announced (or about to be)."""
        with self._lock:
            return self._info

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the background thread; with ``wait``, return once the first announcement round is over.

        A round that fails is logged and retried next period, so returning does not prove visibility.
        """
        if self._thread is not None:
            raise RuntimeError("Announcer already started")
        self._requested = 1
        self._thread = threading.Thread(target=self._run, name=f"announcer-{self.dht_prefix}", daemon=True)
        self._thread.start()
        if wait:
            self._wait_for(1, timeout)

    def update(self, *, wait: bool = False, timeout: float = 30.0, **fields: Any) -> None:
        """Change some ServerInfo fields (e.g. ``state=ServerState.ONLINE``) and announce them at once."""
        with self._lock:
            self._info = self._info.replace(**fields)
            self._requested += 1
            target = self._requested
        self._wakeup.set()
        if wait and self._thread is not None:
            self._wait_for(target, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Announce OFFLINE (so clients stop routing here at once), then end the thread."""
        if self._thread is None:
            return
        with self._lock:
            self._info = self._info.replace(state=ServerState.OFFLINE, next_pings=None)
            self._stopping = True
        self._wakeup.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.1)
            if not _dht_alive(self.dht):  # it went with a group signal: nobody is left to announce through
                break
        if self._thread.is_alive():
            logger.warning("Announcer did not stop (its DHT peer is gone or it took over %.1f s)", timeout)
        self._thread = None

    def _wait_for(self, target: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._done:
            while not self._done.wait_for(lambda: self._completed >= target, 0.1):
                if not _dht_alive(self.dht):  # gone (a group SIGTERM reached it too): it will never finish
                    raise TimeoutError("announcement to the DHT failed: the DHT peer process is gone")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"announcement to the DHT did not finish within {timeout} s")

    def _run(self) -> None:
        while True:
            started = time.perf_counter()
            with self._lock:
                target, stopping = self._requested, self._stopping
            self._announce_once(final=stopping)
            with self._done:
                self._completed = max(self._completed, target)
                self._done.notify_all()
            if stopping:
                return
            delay = self.update_period - (time.perf_counter() - started)
            if delay < 0:
                logger.warning(
                    "Announcing to the DHT took longer than update_period (%.1f s)", self.update_period
                )
            self._wakeup.wait(max(delay, 0.0))
            self._wakeup.clear()

    def _announce_once(self, *, final: bool) -> None:
        # An announcement that fails (DHT busy, peers gone) is logged and retried next period: the thread
        # must survive, or the server would silently vanish from the swarm when its records expire.
        try:
            if self.fields_provider is not None and not final:
                fresh = self.fields_provider()
                with self._lock:
                    self._info = self._info.replace(**fresh)
            with self._lock:
                info = self._info
            expiration_time = get_dht_time() + self.expiration
            stored = declare_blocks(self.dht, self.uids, info, expiration_time)
            if not all(stored.values()):
                logger.warning("The DHT rejected some announcements: %s", stored)
            if self.model_info is not None and not final and not is_private_prefix(self.dht_prefix):
                declare_model(self.dht, self.dht_prefix, self.model_info, expiration_time)
        except Exception:
            logger.warning("Failed to announce blocks %s to the DHT", self.uids, exc_info=True)
