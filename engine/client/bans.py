"""Bans with exponential backoff for peers that fail requests, and the retry schedule of the client.

This is the one place where the client decides how long to avoid a failing server and how long to wait
before retrying; the sequence manager and the sessions only report successes and failures here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently the client retries a failed request through another route."""

    max_retries: int | None = 8  # attempts per step before the error reaches the caller (None: forever)
    min_backoff: float = (
        0.5  # sleep before the 2nd retry; doubles each retry after that (the 1st is immediate)
    )
    max_backoff: float = 30.0
    ban_time: float = 15.0  # a peer's first failure bans it this long; each further failure doubles it
    max_ban_time: float = 600.0

    def delay(self, attempt_no: int) -> float:
        """Seconds to sleep before retry number `attempt_no` (0 = the first retry, done at once)."""
        if attempt_no <= 0:
            return 0.0
        return min(self.min_backoff * 2 ** (attempt_no - 1), self.max_backoff)

    def gives_up(self, attempt_no: int) -> bool:
        """True if attempt `attempt_no` (0-based) failing should be the last one."""
        return self.max_retries is not None and attempt_no + 1 >= self.max_retries


class BanList:
    """Peers that failed recently; each failure in a row doubles the ban, a success clears the streak.

    Thread-safe: sessions in several threads report to one list. `clock` is injectable for tests.
    """

    def __init__(
        self,
        base_time: float = 15.0,
        *,
        backoff_rate: float = 2.0,
        max_time: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if base_time < 0 or backoff_rate < 1 or max_time < base_time:
            raise ValueError("need 0 <= base_time <= max_time and backoff_rate >= 1")
        self.base_time, self.backoff_rate, self.max_time = base_time, backoff_rate, max_time
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    @classmethod
    def from_policy(cls, policy: RetryPolicy, **kwargs) -> BanList:
        return cls(policy.ban_time, max_time=policy.max_ban_time, **kwargs)

    def register_failure(self, peer_id: str) -> float:
        """Ban `peer_id` (longer than last time if it failed before); return the ban length in seconds."""
        with self._lock:
            streak = self._failures.get(peer_id, 0) + 1
            self._failures[peer_id] = streak
            duration = min(self.base_time * self.backoff_rate ** (streak - 1), self.max_time)
            self._until[peer_id] = self._clock() + duration
            return duration

    def register_success(self, peer_id: str) -> None:
        """The peer answered: lift its ban and forget its failure streak."""
        with self._lock:
            self._failures.pop(peer_id, None)
            self._until.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        with self._lock:
            until = self._until.get(peer_id)
            return until is not None and self._clock() < until

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, str) and self.is_banned(peer_id)

    def banned(self) -> frozenset[str]:
        """Peers banned right now (the failure streak outlives the ban, so a relapse is banned longer)."""
        with self._lock:
            now = self._clock()
            return frozenset(peer for peer, until in self._until.items() if now < until)

    def failures(self, peer_id: str) -> int:
        with self._lock:
            return self._failures.get(peer_id, 0)
