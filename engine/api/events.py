"""Event bus between the service (any thread) and SSE listeners (the API's event loop), plus SSE framing.

Listeners keep only the newest value of each event kind: a slow listener gets the current state, never a
backlog, and nothing polls: publishing wakes the listener's task through its loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any


def sse_event(kind: str | None, data: Any) -> bytes:
    """One Server-Sent Event; `data` is sent as compact JSON (or as is when it is already a string)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {kind}\n" if kind else ""
    # JSON never holds raw newlines; a plain string might, and each line needs its own "data:" field.
    body = "".join(f"data: {line}\n" for line in text.split("\n"))
    return (head + body + "\n").encode()


def sse_comment(text: str = "keep-alive") -> bytes:
    """An SSE comment line: ignored by clients, keeps proxies and idle timers from closing the stream."""
    return f": {text}\n\n".encode()


class Subscription:
    """One listener: the newest value per event kind, and a wake-up for its event loop."""

    def __init__(self, bus: EventBus, loop: asyncio.AbstractEventLoop):
        self._bus = bus
        self._loop = loop
        self._lock = threading.Lock()
        self._latest: dict[str, Any] = {}
        self._wake = asyncio.Event()

    def offer(self, kind: str, data: Any) -> None:
        """Called from any thread: remember the value and wake the listener."""
        with self._lock:
            self._latest[kind] = data
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: the listener is gone
            self.close()

    async def next(self, timeout: float) -> list[tuple[str, Any]] | None:
        """Events published since the last call; empty after `timeout` seconds of quiet; None once the bus
        closed (the stream should end)."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return []
        if self._bus.closed:
            return None
        self._wake.clear()
        with self._lock:
            events, self._latest = list(self._latest.items()), {}
        return events

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventBus:
    """Fan-out of (kind, data) events to the current listeners; publish() is thread-safe and never blocks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    def close(self) -> None:
        """End every listener's stream (the server is stopping: open streams would hold its shutdown)."""
        with self._lock:
            self.closed = True
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.offer("closed", None)

    def subscribe(self) -> Subscription:
        """A new listener bound to the running event loop (call from inside it)."""
        subscription = Subscription(self, asyncio.get_running_loop())
        with self._lock:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def publish(self, kind: str, data: Any) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.offer(kind, data)

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._subscriptions)
