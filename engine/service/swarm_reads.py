"""SwarmReads: reads of the swarm (DHT) that a request may wait for, but never longer than a bound.

A DHT read can take seconds (a busy or CPU-starved DHT peer, a traversal through dead peers of a public swarm)
or not answer at all. Requests used to run such reads inline, each on an API worker thread: while the DHT was
slow every swarm, plan, model and hosting request hung, and the app's repeated polls filled the API's thread
pool, so even requests that never touch the DHT queued behind them; only the async /api/status still answered
(the relaunch wedge, issue 11). Here each read (one key: a model's snapshot, the model index, ...) runs in one
background thread at a time, whatever the number of requests that want it; a request waits for it up to
`wait` seconds, gets a value read less than `max_age` seconds ago without waiting, or, when the read is late,
a value up to `stale_after` seconds old, else a SwarmTimeoutError it can show.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from engine.service.errors import SwarmTimeoutError

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    value: Any = None
    read_at: float | None = None  # monotonic time of the last successful read; None: never read
    error: BaseException | None = None  # the last read's failure (cleared by a success)
    flight: threading.Event | None = None  # set when the read in progress ends; None: no read in progress


class SwarmReads:
    """Single-flight, time-bounded reads keyed by what they read; thread-safe."""

    def __init__(self, *, wait: float, stale_after: float, clock: Callable[[], float] = time.monotonic):
        self.wait = wait
        self.stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}
        self.reads_started = 0  # how many reads ran (tests check that piled-up requests share one)

    def start(self, key: Hashable, read: Callable[[], Any], max_age: float) -> threading.Event | None:
        """Begin reading `key` in the background unless a read runs or the value is fresher than `max_age`.

        Returns the event that the read in progress sets when it ends (None when the value is fresh).
        """
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            if entry.flight is not None:
                return entry.flight
            if entry.read_at is not None and self._clock() - entry.read_at <= max_age:
                return None
            flight = entry.flight = threading.Event()
            self.reads_started += 1
        threading.Thread(
            target=self._read, args=(key, read, flight), name="pollinate-swarm-read", daemon=True
        ).start()
        return flight

    def _read(self, key: Hashable, read: Callable[[], Any], flight: threading.Event) -> None:
        started = self._clock()
        try:
            value, error = read(), None
            seconds = self._clock() - started
            if seconds > self.wait:  # requests gave up waiting for it: worth a line when a user reports it
                logger.warning("reading the swarm (%s) took %.1f s", key, seconds)
        except Exception as exc:  # reported to whoever waits; the next request reads again
            value, error = None, exc
            if isinstance(exc, TimeoutError):  # the DHT peer's own bound: say it as a person would read it
                error = SwarmTimeoutError(
                    f"The swarm did not answer ({exc}): its peers may be busy or unreachable. "
                    "Try again in a moment."
                )
            logger.warning("reading the swarm (%s) failed: %s", key, exc)
        with self._lock:
            entry = self._entries[key]
            if error is None:
                entry.value, entry.read_at, entry.error = value, self._clock(), None
            else:
                entry.error = error
            entry.flight = None
        flight.set()

    def get(
        self,
        key: Hashable,
        read: Callable[[], Any],
        *,
        max_age: float,
        what: str,
        wait: float | None = None,
        stale_after: float | None = None,
    ) -> Any:
        """The value of `key`, read again if older than `max_age`; waits at most `wait` seconds (default:
        the reads' own).

        A read that ends in an error raises it; a late read gives the last value if it is younger than
        `stale_after`, else raises SwarmTimeoutError naming `what` was read.
        """
        return self.get_many({key: read}, max_age=max_age, what=what, wait=wait, stale_after=stale_after)[key]

    def get_many(
        self,
        reads: dict[Hashable, Callable[[], Any]],
        *,
        max_age: float,
        what: str,
        wait: float | None = None,
        stale_after: float | None = None,
        errors: bool = False,
    ) -> dict:
        """Several keys read in parallel under one deadline (e.g. every model of /v1/models).

        With `errors`, a key whose read failed or is late maps to its exception instead of raising it.
        """
        flights = {key: self.start(key, read, max_age) for key, read in reads.items()}
        waited = self.wait if wait is None else wait
        deadline = self._clock() + waited
        for flight in flights.values():
            if flight is not None:
                flight.wait(max(0.0, deadline - self._clock()))
        stale = self.stale_after if stale_after is None else stale_after
        results = {}
        for key, flight in flights.items():
            try:
                results[key] = self._result(key, flight, what, stale, waited)
            except Exception as exc:
                if not errors:
                    raise
                results[key] = exc
        return results

    def _result(
        self, key: Hashable, flight: threading.Event | None, what: str, stale_after: float, waited: float
    ) -> Any:
        with self._lock:
            entry = self._entries[key]
            if flight is None or flight.is_set():
                if entry.error is not None and (flight is not None or entry.read_at is None):
                    raise entry.error
                return entry.value
            if entry.read_at is not None and self._clock() - entry.read_at <= stale_after:
                return entry.value  # the read is late: what it said a moment ago is still worth showing
        raise SwarmTimeoutError(
            f"The swarm did not answer within {waited:g} s while reading {what}: its peers may be busy "
            "or unreachable. The engine keeps trying in the background; try again in a moment."
        )

    def peek(self, key: Hashable) -> Any:
        """The last value read for `key` (None if never), without reading."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.value if entry is not None else None
