"""The Reading record every detector returns, and the Detector interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Reading:
    """One measurement of one detector.

    `value` is the detector's number (a percentage, seconds, degrees, or 1.0/0.0 for yes/no); None when it
    could not measure. `unsupported` says, for a person, why the detector cannot work here (then it never
    pauses anything, and Settings shows the sentence). `detail` names what was seen (an app, a battery level).
    `until` (epoch seconds) is when the condition will change by itself, when known (the schedule).
    """

    name: str
    value: float | None
    detail: str = ""
    unsupported: str | None = None
    until: float | None = None

    @property
    def supported(self) -> bool:
        return self.unsupported is None


class Detector(Protocol):
    """A source of readings: cheap to construct, `read()` does the measuring and never raises."""

    name: str

    def read(self) -> Reading: ...


def unsupported(name: str, why: str) -> Reading:
    """A Reading that says the detector cannot work on this machine, and why."""
    return Reading(name, None, unsupported=why)
