"""The politeness policy: a pure function from detector readings to "pause or share", with hysteresis.

Each rule looks at one reading and says "on" (its cause is present), "off" (clearly gone) or "band"
(between a threshold and the threshold minus the margin: keep the current state). A rule turns active after
its cause has been on for `enter_seconds` and inactive after it has been off for `resume_after_seconds`, so
a detector hovering at its threshold never makes sharing flap. Sharing pauses while any rule is active.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine.polite.readings import Reading
from engine.polite.settings import PolicySettings


@dataclass(frozen=True)
class Rule:
    """One reason to pause: which reading it reads, whether it frees memory at once, how it words itself."""

    reason: str
    reading: str
    release: bool  # the cause needs the memory (a game): free the weights at once
    immediate: bool  # no enter delay (a listed program, the schedule: no spikes to ride out)
    enabled: Callable[[PolicySettings, bool], bool]
    condition: Callable[[float, PolicySettings], str]  # "on" | "off" | "band"
    message: Callable[[Reading], str]


def _threshold(value: float, limit: float, margin: float) -> str:
    if value > limit:
        return "on"
    return "off" if value <= limit - margin else "band"


def _flag(value: float, _settings) -> str:
    return "on" if value >= 1.0 else "off"


RULES: tuple[Rule, ...] = (
    Rule(
        "exclusive_app", "exclusive_app", True, True,
        lambda s, cpu: bool(s.exclusive_apps), _flag,
        lambda r: f"{r.detail or 'An exclusive application'} is running",
    ),
    Rule(
        "fullscreen", "fullscreen", True, False,
        lambda s, cpu: s.pause_on_fullscreen, _flag,
        lambda r: f"{r.detail or 'An application'} is in full screen",
    ),
    Rule(
        "gpu_busy", "gpu", True, False,
        lambda s, cpu: s.gpu_busy_percent is not None,
        lambda v, s: _threshold(v, s.gpu_busy_percent, s.hysteresis_margin),
        lambda r: f"Other programs use the GPU ({r.value:.0f}%)",
    ),
    Rule(
        "gpu_hot", "gpu_temperature", False, False,
        lambda s, cpu: s.max_gpu_temperature is not None,
        lambda v, s: _threshold(v, s.max_gpu_temperature, s.hysteresis_margin),
        lambda r: f"The GPU is hot ({r.value:.0f} °C)",
    ),
    Rule(
        "cpu_busy", "cpu", False, False,
        lambda s, cpu: cpu and s.cpu_busy_percent is not None,
        lambda v, s: _threshold(v, s.cpu_busy_percent, s.hysteresis_margin),
        lambda r: f"Other programs use the CPU ({r.value:.0f}%)",
    ),
    Rule(
        "on_battery", "battery", False, False,
        lambda s, cpu: s.pause_on_battery, _flag,
        lambda r: f"Running on battery ({r.detail})",
    ),
    Rule(
        "user_active", "user_idle", False, False,
        lambda s, cpu: s.pause_when_user_active,
        lambda v, s: "on" if v < s.user_idle_seconds else "off",
        lambda r: "You are using this computer",
    ),
    Rule(
        "schedule", "schedule", False, True,
        lambda s, cpu: bool(s.schedule), _flag,
        lambda r: "Outside the sharing schedule",
    ),
)  # fmt: skip
RULES_BY_READING = {rule.reading: rule for rule in RULES}


@dataclass(frozen=True)
class RuleMemory:
    """What a rule remembers between decisions."""

    active: bool = False
    on_since: float | None = None
    off_since: float | None = None
    message: str = ""  # the rule's words from its latest reading
    until: float | None = None


@dataclass(frozen=True)
class PolicyMemory:
    """The policy's state between decisions (start with PolicyMemory())."""

    rules: Mapping[str, RuleMemory] = field(default_factory=dict)
    paused_since: float | None = None


@dataclass(frozen=True)
class Decision:
    """Pause or share, and if paused: why (the first active rule), until when, and whether to free memory."""

    pause: bool
    reason: str | None = None
    message: str | None = None
    until: float | None = None
    release: bool = False
    active: tuple[str, ...] = ()


def step_rule(
    memory: RuleMemory, condition: str, now: float, enter: float, resume_after: float
) -> RuleMemory:
    """One rule's hysteresis: on for `enter` seconds -> active; off for `resume_after` seconds -> inactive."""
    if condition == "on":
        on_since = memory.on_since if memory.on_since is not None else now
        active = memory.active or now - on_since >= enter
        return dataclasses.replace(memory, active=active, on_since=on_since, off_since=None)
    if condition == "off":
        off_since = memory.off_since if memory.off_since is not None else now
        active = memory.active and now - off_since < resume_after
        return dataclasses.replace(memory, active=active, on_since=None, off_since=off_since)
    # In the band: an active rule stays active (and its clear timer restarts), an idle one stays idle.
    on_since = memory.on_since if memory.active else None
    return dataclasses.replace(memory, on_since=on_since, off_since=None)


def decide(
    memory: PolicyMemory,
    readings: Mapping[str, Reading],
    settings: PolicySettings,
    now: float,
    *,
    hosting_on_cpu: bool = False,
) -> tuple[PolicyMemory, Decision]:
    """The next memory and decision from the latest readings (`now` in seconds, any monotonic clock)."""
    rules: dict[str, RuleMemory] = {}
    active: list[tuple[Rule, RuleMemory]] = []
    for rule in RULES:
        reading = readings.get(rule.reading)
        before = memory.rules.get(rule.reason, RuleMemory())
        if not rule.enabled(settings, hosting_on_cpu) or (reading is not None and not reading.supported):
            continue  # off, or cannot work here: never pauses (Settings says why)
        if reading is None:  # not read this time: nothing changes
            after = before
        elif reading.value is None:  # a failed read: keep the state, count no time either way
            after = dataclasses.replace(before, on_since=None, off_since=None)
        else:
            enter = 0.0 if rule.immediate else settings.enter_seconds
            condition = rule.condition(float(reading.value), settings)
            after = step_rule(before, condition, now, enter, settings.resume_after_seconds)
            after = dataclasses.replace(after, message=rule.message(reading), until=reading.until)
        rules[rule.reason] = after
        if after.active:
            active.append((rule, after))
    if not active:
        return PolicyMemory(rules, None), Decision(False)
    paused_since = memory.paused_since if memory.paused_since is not None else now
    rule, first = active[0]
    release = any(r.release for r, _ in active) or now - paused_since >= settings.hold_seconds
    decision = Decision(
        True,
        reason=rule.reason,
        message=first.message,
        until=first.until if rule.reason == "schedule" else None,
        release=release,
        active=tuple(r.reason for r, _ in active),
    )
    return PolicyMemory(rules, paused_since), decision
