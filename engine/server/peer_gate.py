"""At most a few requests of one peer are worked on at a time; the rest wait without costing anything.

The task queue shares the compute thread between peers (task_pool.FairClock), but decoding a request,
checking it and encoding its reply run on the event loop, which serves everyone in arrival order: a peer
with 50 sessions stepping at once would fill that loop, and every other peer's step would wait behind 50
decodes. A per-peer gate keeps each peer to `slots` requests in progress (the server uses 1 per kind of
request); compute is serial anyway, and decoding shares the interpreter lock with it, so a peer alone loses
little throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class PeerGate:
    """Per-peer asyncio semaphores, made on first use and dropped when nobody holds or waits for them."""

    def __init__(self, slots: int = 2):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self._gates: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def enter(self, peer: str) -> AsyncIterator[None]:
        """Hold one of `peer`'s slots for the duration of the block (waiting for one if all are taken)."""
        semaphore, users = self._gates.get(peer, (None, 0))
        if semaphore is None:
            semaphore = asyncio.Semaphore(self.slots)
        self._gates[peer] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._gates[peer]
            if users <= 1:
                del self._gates[peer]
            else:
                self._gates[peer] = (semaphore, users - 1)

    def waiting(self, peer: str) -> int:
        """How many of `peer`'s requests hold or wait for a slot now."""
        return self._gates.get(peer, (None, 0))[1]
