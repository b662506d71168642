"""A bounded budget for KV caches: sessions reserve bytes before they start and give them back when they end.

The cache tensors themselves are made by the model code (engine.models' SpanCache); this module only decides
who may have them. Allocations are served in arrival order: a large request that waits for room is not starved
by a stream of small ones behind it. All methods run on the handler's event loop; the byte counters
may be read from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

MIB = 1024**2


class AllocationFailed(RuntimeError):
    """The KV cache cannot fit this session (now, or within the allowed wait)."""


@dataclass(frozen=True)
class Allocation:
    """A reservation of `nbytes` of cache budget, alive inside `MemoryCache.allocate`."""

    handle: int
    nbytes: int


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"


class MemoryCache:
    """Tracks a KV-cache budget of `max_size_bytes` shared by all inference sessions of one server."""

    def __init__(self, max_size_bytes: int, max_alloc_timeout: float | None = None):
        if max_size_bytes < 0:
            raise ValueError(f"max_size_bytes must be >= 0, got {max_size_bytes}")
        self.max_size_bytes = int(max_size_bytes)
        self.max_alloc_timeout = max_alloc_timeout
        self._used = 0
        self._handles = itertools.count()
        self._live: dict[int, int] = {}
        self._queue_lock: asyncio.Lock | None = None  # created on the loop that first allocates
        self._freed: asyncio.Event | None = None

    @property
    def used_bytes(self) -> int:
        """Bytes reserved by live sessions."""
        return self._used

    @property
    def bytes_left(self) -> int:
        """Bytes still free in the budget."""
        return self.max_size_bytes - self._used

    @property
    def num_allocations(self) -> int:
        """How many sessions hold a reservation now."""
        return len(self._live)

    def tokens_left(self, bytes_per_token: int) -> int:
        """How many more tokens fit, for a cache that costs `bytes_per_token` per token."""
        return self.bytes_left // max(1, int(bytes_per_token))

    @contextlib.asynccontextmanager
    async def allocate(self, nbytes: int, timeout: float = 0.0) -> AsyncIterator[Allocation]:
        """Reserve `nbytes` for the duration of the `async with` block, waiting up to `timeout` s for room.

        Raises AllocationFailed with a message the client can act on when the budget cannot fit it in time.
        """
        allocation = await self._acquire(int(nbytes), timeout)
        try:
            yield allocation
        finally:
            self._release(allocation)

    async def _acquire(self, nbytes: int, timeout: float) -> Allocation:
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative size ({nbytes} bytes)")
        if self.max_alloc_timeout is not None:
            timeout = min(timeout, self.max_alloc_timeout)
        timeout = max(0.0, float(timeout))
        if nbytes > self.max_size_bytes:
            raise AllocationFailed(self._failure_message(nbytes, "it is larger than the whole cache"))
        if self._queue_lock is None:
            self._queue_lock, self._freed = asyncio.Lock(), asyncio.Event()
        if timeout <= 0:
            # No time to wait: one look decides; a queued waiter ahead of us means "no room now".
            if self._queue_lock.locked() or nbytes > self.bytes_left:
                raise AllocationFailed(self._failure_message(nbytes, "no wait allowed"))
            return self._reserve(nbytes)
        try:
            async with asyncio.timeout(timeout):
                # The lock makes waiters take turns in arrival order; its holder waits for frees below.
                async with self._queue_lock:
                    while nbytes > self.bytes_left:
                        self._freed.clear()
                        await self._freed.wait()
                    return self._reserve(nbytes)
        except TimeoutError:
            raise AllocationFailed(self._failure_message(nbytes, f"waited {timeout:g} s")) from None

    def _reserve(self, nbytes: int) -> Allocation:
        handle = next(self._handles)
        self._live[handle] = nbytes
        self._used += nbytes
        return Allocation(handle, nbytes)

    def _release(self, allocation: Allocation) -> None:
        nbytes = self._live.pop(allocation.handle, None)
        if nbytes is None:
            return
        self._used -= nbytes
        if self._freed is not None:
            self._freed.set()

    def _failure_message(self, nbytes: int, reason: str) -> str:
        return (
            f"cache full: needs {_mib(nbytes)}, {_mib(self.bytes_left)} free of {_mib(self.max_size_bytes)} "
            f"({reason}); try a shorter max_length or another server"
        )
