"""One compute loop for all block computations of a server: a worker thread serving a priority queue.

Running every block computation on one thread keeps GPU work serial (no two requests fight over memory or
kernels) and lets the queue decide who goes next: inference steps first (a person is waiting for each token),
then forward/backward; within a class the caller's priority, then arrival order.

A priority is a delay in seconds (lower = sooner; earned through engine.ledger): a task takes its place in
the queue as if it had arrived `priority` seconds later than it did. This is aging: a waiting task's
effective priority improves with every second it waits, so it can only be overtaken by tasks that arrive
within its own delay, and its wait is bounded (no starvation), however much better-placed work keeps coming.

Arrival is counted per peer (the libp2p-authenticated caller): a peer's task arrives, for the queue, no
sooner than the end of the work it already has queued (a virtual clock, `FairClock`). A peer that sends 50
sessions at once gets them queued one after the other in its own line, and another peer's step goes in
between instead of behind all of them; a peer alone still gets the whole server (the queue never idles).

A small task that finds the loop idle (nothing queued, nothing running, no throttle) may run at once on the
caller's thread (`run_if_idle`): the queue would have handed it to the worker first anyway, and a decode step
then skips two thread hand-offs (each a wake-up that a loaded machine may delay by milliseconds). The worker
takes nothing from the queue while such a task runs, so computations stay one at a time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

logger = logging.getLogger(__name__)


class TaskKind(IntEnum):
    """What a task computes; decides its class in the queue."""

    INFERENCE = 0
    FORWARD = 1
    BACKWARD = 2


class PoolStopped(RuntimeError):
    """The compute loop has stopped (the server is shutting down); the task did not run."""


def task_order(
    kind: TaskKind, priority: float, seq: int, submitted_at: float = 0.0
) -> tuple[int, float, int]:
    """The queue key of a task: inference before forward/backward, then arrival + priority delay, then seq.

    Sorting by `submitted_at + priority` is the same as sorting by `priority - waited` at any instant, so
    every queued task ages at the same rate and a task with delay d waits at most d plus the work ahead of it.
    """
    return (0 if kind == TaskKind.INFERENCE else 1, submitted_at + float(priority), seq)


class FairClock:
    """Virtual arrival times per peer: a peer's next task starts, in queue time, when its queued work ends.

    Work is counted in cost units (tokens x blocks) converted to seconds by a running average of what a
    unit took on this server, per task kind. Pure bookkeeping (the caller passes the time).
    """

    _SMOOTHING = 0.2
    _MAX_PEERS = 4096

    def __init__(self, seconds_per_unit: float = 1e-4):
        self.seconds_per_unit: dict[TaskKind, float] = dict.fromkeys(TaskKind, seconds_per_unit)
        self._ends: dict[str, float] = {}

    def arrival(self, peer: str, kind: TaskKind, cost: float, now: float) -> float:
        """The queue arrival time of a task of `cost` units from `peer` submitted at `now`."""
        start = max(now, self._ends.get(peer, now))
        self._ends[peer] = start + max(cost, 0.0) * self.seconds_per_unit[kind]
        if len(self._ends) > self._MAX_PEERS:  # peers whose queued work has ended need no entry
            self._ends = {p: end for p, end in self._ends.items() if end > now}
        return start

    def observe(self, kind: TaskKind, cost: float, seconds: float) -> None:
        """Learn how long a unit of work of this kind takes here."""
        if cost > 0 and seconds >= 0:
            old = self.seconds_per_unit[kind]
            self.seconds_per_unit[kind] = old + self._SMOOTHING * (seconds / cost - old)


@dataclass(order=True)
class _Task:
    key: tuple[int, float, int]
    fn: Callable[..., Any] = field(compare=False)
    args: tuple = field(compare=False)
    future: Future = field(compare=False)
    kind: TaskKind = field(compare=False)
    cost: float = field(compare=False, default=0.0)


@dataclass
class PoolStats:
    """Counters of work done, read by the host for its dashboard and load reports."""

    tasks_done: dict[TaskKind, int] = field(default_factory=lambda: dict.fromkeys(TaskKind, 0))
    busy_seconds: float = 0.0


class TaskPool:
    """A priority queue of block computations and the single worker thread that runs them."""

    def __init__(self, name: str = "pollinate-compute"):
        self.name = name
        self.stats = PoolStats()
        self._heap: list[_Task] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running = False  # a task is computing (on the worker, or inline on a caller's thread)
        self.clock = FairClock()
        # Throttle (polite sharing): the share of wall time the loop may compute; after a task of t seconds
        # it rests t * (1 / share - 1) before the next one. 1.0: no rest.
        self.compute_share = 1.0

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        """True while the worker thread is alive and accepting tasks."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        kind: TaskKind,
        priority: float = 0.0,
        peer: str = "",
        cost: float = 1.0,
    ) -> Future:
        """Queue `fn(*args)` for `peer`; returns a Future of its result (cancelled before it runs: skipped).

        `cost` is the task's size in tokens x blocks: it moves the peer's later tasks back in the queue.
        """
        future: Future = Future()
        with self._cond:
            if self._stopping or self._thread is None:
                raise PoolStopped("the compute loop is not running (server stopping or not started)")
            arrival = self.clock.arrival(peer, kind, cost, time.monotonic())
            key = task_order(kind, priority, next(self._seq), arrival)
            task = _Task(key, fn, args, future, kind, cost)
            heapq.heappush(self._heap, task)
            self._cond.notify()
        return future

    async def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        kind: TaskKind,
        priority: float = 0.0,
        peer: str = "",
        cost: float = 1.0,
    ) -> Any:
        """Queue `fn(*args)` and await its result; cancelling the await drops a still-queued task."""
        future = self.submit(fn, *args, kind=kind, priority=priority, peer=peer, cost=cost)
        return await asyncio.wrap_future(future)

    def run_if_idle(
        self, fn: Callable[..., Any], *args: Any, kind: TaskKind, peer: str = "", cost: float = 1.0
    ) -> tuple[bool, Any]:
        """Run `fn(*args)` on this thread now if the loop is idle: (True, its result); else (False, None).

        Idle: running, nothing queued or computing, and no throttle (a resting loop keeps its rests). The
        task counts as the loop's work (stats, the peer's fair-share clock); its exceptions propagate.
        """
        with self._cond:
            busy = self._heap or self._running or self.compute_share < 1
            if busy or self._stopping or self._thread is None:
                return False, None
            self._running = True
            self.clock.arrival(peer, kind, cost, time.monotonic())
        started = time.perf_counter()
        try:
            return True, fn(*args)
        finally:
            self._finished(kind, cost, time.perf_counter() - started, inline=True)

    def _finished(self, kind: TaskKind, cost: float, spent: float, inline: bool = False) -> None:
        with self._cond:
            self._running = False
            self.stats.busy_seconds += spent
            self.stats.tasks_done[kind] += 1
            self.clock.observe(kind, cost, spent)
            if inline and self._heap:  # the worker waited for the inline task; otherwise it sleeps on
                self._cond.notify()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop taking tasks, fail the queued ones with PoolStopped, let the running one finish, join."""
        with self._cond:
            self._stopping = True
            pending, self._heap = self._heap, []
            self._cond.notify_all()
        for task in pending:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(PoolStopped("the server stopped before this task ran"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning(
                    "compute loop still busy %.0f s after stop; leaving it (daemon thread)", timeout
                )

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._heap or self._running) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                task = heapq.heappop(self._heap)
                if not task.future.set_running_or_notify_cancel():
                    continue  # the requester gave up while the task was queued
                self._running = True
            started = time.perf_counter()
            try:
                result = task.fn(*task.args)
            except BaseException as error:  # every failure belongs to the requester, not to the loop
                error_result: BaseException | None = error
            else:
                error_result = None
            spent = time.perf_counter() - started
            # Free the loop before the requester hears back, so its next small task may run inline at once.
            self._finished(task.kind, task.cost, spent)
            if error_result is not None:
                task.future.set_exception(error_result)
            else:
                task.future.set_result(result)
            share = self.compute_share
            if share < 1.0:
                with self._cond:  # rest after the answer went out; a stop ends the rest at once
                    self._cond.wait_for(lambda: self._stopping, timeout=spent * (1.0 / share - 1.0))
