"""Run the service's blocking generator in a thread and consume it from the event loop, cancellably.

Closing the stream (client gone, request done) sets the cancel flag and closes the generator in its own
thread, so the service leaves its inference session and the servers free that session's cache.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

from engine.service import Finished, GenerationEvent, Started

_END = object()


class GenerationStream:
    """Async iteration over GenerationEvents produced by `produce(cancel)` in a worker thread."""

    def __init__(self, produce: Callable[[threading.Event], Iterator[GenerationEvent]]):
        self.cancel = threading.Event()
        self._produce = produce
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="pollinate-generation", daemon=True)
        self._done = False
        self._thread.start()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody listens any more
            self.cancel.set()

    def _work(self) -> None:
        events = None
        try:
            events = self._produce(self.cancel)
            for event in events:
                if self.cancel.is_set():
                    break
                self._put(event)
        except BaseException as exc:
            self._put(exc)
        finally:
            if events is not None and hasattr(events, "close"):
                try:
                    events.close()  # runs the generator's cleanup (closes the inference session) here
                except Exception as exc:
                    self._put(exc)
            self._put(_END)

    async def next(self) -> GenerationEvent | None:
        """The next event, None at the end; re-raises the producer's exception."""
        if self._done:
            return None
        item = await self._queue.get()
        if item is _END:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            self.cancel.set()
            raise item
        return item

    async def start(self) -> Started:
        """Wait until the session is open (so errors before any text still get a proper HTTP status)."""
        event = await self.next()
        if not isinstance(event, Started):
            raise RuntimeError(f"generation ended before it started: {event!r}")
        return event

    def close(self) -> None:
        """Stop generating; the worker notices before its next token and cleans up."""
        self.cancel.set()

    def abort(self, error: BaseException) -> None:
        """End the stream with `error` (raised by next()) and stop generating; thread-safe."""
        self.cancel.set()
        self._put(error)

    async def collect(self) -> tuple[str, Finished]:
        """All remaining text and the Finished event."""
        parts: list[str] = []
        finished = None
        while (event := await self.next()) is not None:
            if isinstance(event, Finished):
                finished = event
            elif hasattr(event, "text"):
                parts.append(event.text)
        if finished is None:
            raise RuntimeError("generation stopped without finishing")
        return "".join(parts), finished


class OpenStreams:
    """The generations in progress, so that a shutdown can end each one with an error its client sees."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: set[GenerationStream] = set()
        self._closed_with: BaseException | None = None

    def add(self, stream: GenerationStream) -> None:
        """Track `stream` until `discard`; after `abort_all` a new stream is ended at once."""
        with self._lock:
            error = self._closed_with
            if error is None:
                self._streams.add(stream)
        if error is not None:
            stream.abort(error)

    def refuse_if_closed(self) -> None:
        """Raise the shutdown's error once the streams were ended (a request that comes while stopping)."""
        if self._closed_with is not None:
            raise self._closed_with

    def discard(self, stream: GenerationStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def abort_all(self, error: BaseException) -> int:
        """End every open stream (and any later one) with `error`; returns how many were open."""
        with self._lock:
            self._closed_with = error
            streams, self._streams = list(self._streams), set()
        for stream in streams:
            stream.abort(error)
        return len(streams)


async def wait_for_disconnect(receive) -> None:
    """Return when the HTTP client goes away (after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
