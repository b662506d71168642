"""A weekly schedule of when sharing may run ("mon-fri 18:00-23:00", "sat 00:00-24:00", "sun 22:00-06:00").

Outside every window sharing pauses, and the Reading says until when (the next window's start). A window
whose end is not after its start runs overnight into the next day; the week wraps from Sunday to Monday.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable

from engine.polite.readings import Reading

NAME = "schedule"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEK = 7 * 1440  # minutes
_ENTRY = re.compile(r"^\s*([a-z]{3})(?:\s*-\s*([a-z]{3}))?\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class ScheduleError(ValueError):
    """A schedule entry that cannot be read; the message shows the expected form."""


def parse_schedule(entries: Iterable[str]) -> list[tuple[int, int]]:
    """Merged [start, end) windows in minutes from Monday 00:00 (never crossing the week's end)."""
    windows: list[tuple[int, int]] = []
    for entry in entries:
        match = _ENTRY.match(entry.lower())
        if match is None:
            raise ScheduleError(f"cannot read schedule entry {entry!r}: write it like 'mon-fri 18:00-23:30'")
        first, last, h1, m1, h2, m2 = match.groups()
        if first not in DAYS or (last and last not in DAYS):
            raise ScheduleError(f"unknown day in {entry!r}: use {', '.join(DAYS)}")
        start, end = int(h1) * 60 + int(m1), int(h2) * 60 + int(m2)
        if int(m1) > 59 or int(m2) > 59 or start > 1440 or end > 1440 or start == 1440:
            raise ScheduleError(f"bad time in {entry!r}: hours 00-24, minutes 00-59")
        if end <= start:
            end += 1440  # overnight
        a, b = DAYS.index(first), DAYS.index(last or first)
        days = range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)]
        for day in days:
            s, e = day * 1440 + start, day * 1440 + end
            if e > WEEK:  # Sunday night into Monday morning
                windows += [(s, WEEK), (0, e - WEEK)]
            else:
                windows.append((s, e))
    merged: list[tuple[int, int]] = []
    for s, e in sorted(windows):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def schedule_state(now: dt.datetime, windows: list[tuple[int, int]]) -> tuple[bool, dt.datetime | None]:
    """(inside a window now, when that changes); no windows means no schedule: always inside."""
    if not windows or windows == [(0, WEEK)]:
        return True, None
    minute = now.weekday() * 1440 + now.hour * 60 + now.minute + now.second / 60 + now.microsecond / 6e7
    for s, e in windows:
        if s <= minute < e:
            end = e
            if e == WEEK and windows[0][0] == 0:  # the window goes on past Sunday midnight
                end = WEEK + windows[0][1]
            return True, now + dt.timedelta(minutes=end - minute)
    upcoming = [s for s, _ in windows if s > minute]
    start = upcoming[0] if upcoming else windows[0][0] + WEEK
    return False, now + dt.timedelta(minutes=start - minute)


class ScheduleDetector:
    """1.0 outside the schedule (sharing should pause) with `until` the next window's start; else 0.0."""

    name = NAME

    def __init__(self, entries: Callable[[], Iterable[str]], clock: Callable[[], dt.datetime] | None = None):
        self.entries = entries
        self.clock = clock or dt.datetime.now

    def read(self) -> Reading:
        try:
            windows = parse_schedule(self.entries())
        except ScheduleError as exc:
            return Reading(NAME, None, detail=str(exc))
        now = self.clock()
        inside, change = schedule_state(now, windows)
        until = change.timestamp() if change is not None else None
        if inside:
            return Reading(NAME, 0.0, detail="inside the schedule", until=until)
        return Reading(NAME, 1.0, detail="outside the schedule", until=until)
