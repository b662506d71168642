"""The politeness settings: which detectors pause sharing, their thresholds, and the hysteresis.

A frozen record, validated field by field, read from and written to plain JSON (the app's Settings window
sends it through PUT /api/policy; the engine keeps the last one in its data folder). Defaults suit a gaming
PC: step aside for full-screen apps, for other GPU work and on battery; resume a minute after it all clears.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.polite.schedule import ScheduleError, parse_schedule


class PolicyError(ValueError):
    """A setting out of range; the message names it and its valid range."""


@dataclass(frozen=True)
class PolicySettings:
    """What pauses sharing. Thresholds of None turn their detector off."""

    # Pause while a full-screen application (a game, a video) has the foreground.
    pause_on_fullscreen: bool = True
    # Pause while one of these programs runs (executable names, `*` wildcards; "exclusive applications").
    exclusive_apps: tuple[str, ...] = ()
    # Pause while other processes use more than this percent of the GPU (NVML; hosting on a GPU).
    gpu_busy_percent: float | None = 20.0
    # Pause while other processes use more than this percent of the machine's CPU (only when hosting on the
    # CPU; off by default: a gaming PC hosts on its GPU, and a CPU host often shares the machine on purpose).
    cpu_busy_percent: float | None = None
    # Pause while the user is at the machine (input within `user_idle_seconds`); off by default.
    pause_when_user_active: bool = False
    user_idle_seconds: float = 300.0
    # Pause on battery power.
    pause_on_battery: bool = True
    # Pause above this GPU temperature (degrees Celsius).
    max_gpu_temperature: float | None = 85.0
    # When sharing may run ("mon-fri 18:00-23:30", ...); empty: any time.
    schedule: tuple[str, ...] = ()
    # Hysteresis: a condition must hold this long before it pauses (a short spike does not) ...
    enter_seconds: float = 3.0
    # ... and everything must stay clear this long before sharing resumes ...
    resume_after_seconds: float = 60.0
    # ... and a threshold clears only this many units below it (percent or degrees).
    hysteresis_margin: float = 10.0
    # A pause keeps the weights loaded (resume in about a second) this long, then frees them. Pauses for
    # a game (full screen, exclusive app, GPU busy) free the memory at once: the game needs it.
    hold_seconds: float = 120.0
    # Seconds running sessions get to finish before a pause ends them (our client replays elsewhere).
    grace_seconds: float = 10.0
    # Throttle while sharing: inference sessions served at once (None: no cap), and the share of compute
    # time sharing may take (1.0: all it needs; 0.5: the compute loop rests as long as it worked).
    max_sessions: int | None = None
    compute_share: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "exclusive_apps", tuple(str(a).strip() for a in self.exclusive_apps if str(a).strip())
        )
        object.__setattr__(self, "schedule", tuple(str(s).strip() for s in self.schedule if str(s).strip()))
        for name, low, high in (
            ("gpu_busy_percent", 1.0, 100.0),
            ("cpu_busy_percent", 1.0, 100.0),
            ("max_gpu_temperature", 40.0, 110.0),
        ):
            value = getattr(self, name)
            if value is not None and not low <= float(value) <= high:
                raise PolicyError(f"{name} must be between {low:g} and {high:g} (or null to turn it off)")
        for name, high in (
            ("user_idle_seconds", 86400.0),
            ("enter_seconds", 3600.0),
            ("resume_after_seconds", 86400.0),
            ("hysteresis_margin", 50.0),
            ("hold_seconds", 86400.0),
            ("grace_seconds", 3600.0),
        ):
            if not 0.0 <= float(getattr(self, name)) <= high:
                raise PolicyError(f"{name} must be between 0 and {high:g}")
        if self.max_sessions is not None and (
            isinstance(self.max_sessions, bool) or not 1 <= int(self.max_sessions) <= 1000
        ):
            raise PolicyError("max_sessions must be between 1 and 1000 (or null for no cap)")
        if not 0.05 <= float(self.compute_share) <= 1.0:
            raise PolicyError("compute_share must be between 0.05 and 1")
        try:
            parse_schedule(self.schedule)
        except ScheduleError as exc:
            raise PolicyError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exclusive_apps"], data["schedule"] = list(self.exclusive_apps), list(self.schedule)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicySettings:
        """From JSON; unknown keys are an error (a typo must not silently keep a default)."""
        if not isinstance(data, dict):
            raise PolicyError("policy settings must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(f"unknown policy setting(s): {', '.join(unknown)}")
        values = dict(data)
        for name in ("exclusive_apps", "schedule"):
            if name in values:
                if isinstance(values[name], str) or not isinstance(values[name], (list, tuple)):
                    raise PolicyError(f"{name} must be a list of strings")
                values[name] = tuple(values[name])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise PolicyError(str(exc)) from None
