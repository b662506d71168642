"""Other processes' CPU use (psutil): what a machine hosting on its CPU must not compete with.

The share is measured between two reads: the machine's busy CPU time minus our own process tree's
(the engine and its children: DHT peers, p2p daemons), over the wall time and the number of cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.polite.readings import Reading, unsupported

NAME = "cpu"


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at a moment: all busy time of the machine (or the watched processes)
    and our own process tree's."""

    wall: float
    busy: float
    own: float


def other_cpu_percent(previous: CpuSample, current: CpuSample, cores: int) -> float:
    """Percent of the whole machine (0..100) that other processes used between two samples."""
    wall = current.wall - previous.wall
    if wall <= 0 or cores < 1:
        return 0.0
    # Our children that ended take their CPU time with them, so `own` can shrink: never count it negative.
    other = (current.busy - previous.busy) - max(0.0, current.own - previous.own)
    return round(min(100.0, max(0.0, 100.0 * other / (wall * cores))), 1)


def busy_seconds(times) -> float:
    """Busy time from a psutil.cpu_times() record: everything except idle and iowait."""
    fields = times._asdict()
    return sum(v for k, v in fields.items() if k not in ("idle", "iowait", "guest", "guest_nice"))


class CpuDetector:
    """Reads other processes' CPU share; the first read only takes the baseline (value None).

    `watch` (optional) narrows "other processes" to those it accepts (a psutil.Process -> bool): a bench or
    test on a shared machine watches its own load generator only.
    """

    name = NAME

    def __init__(self, own_pid: int | None = None, watch: Callable[[object], bool] | None = None):
        self.own_pid = own_pid or os.getpid()
        self.watch = watch
        self._previous: CpuSample | None = None

    def read(self) -> Reading:
        try:
            import psutil
        except ImportError:
            return unsupported(NAME, "psutil is not installed")
        try:
            sample = self._sample(psutil)
            cores = psutil.cpu_count() or 1
        except Exception as exc:  # a platform without CPU times
            return unsupported(NAME, f"cannot read CPU times here ({exc})")
        previous, self._previous = self._previous, sample
        if previous is None:
            return Reading(NAME, None, detail="measuring")
        return Reading(NAME, other_cpu_percent(previous, sample, cores))

    def _sample(self, psutil) -> CpuSample:
        now = time.monotonic()
        own = _tree_seconds(psutil, self.own_pid)
        if self.watch is None:
            return CpuSample(now, busy_seconds(psutil.cpu_times()), own)
        busy = 0.0
        for process in psutil.process_iter():
            try:
                if self.watch(process):
                    busy += _seconds(process.cpu_times())
            except psutil.Error:
                continue
        return CpuSample(now, busy, 0.0)


def _seconds(times) -> float:
    return times.user + times.system


def _tree_seconds(psutil, pid: int) -> float:
    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for process in processes:
        try:
            total += _seconds(process.cpu_times())
        except psutil.Error:
            continue
    return total
