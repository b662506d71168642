"""The politeness policy: hysteresis (no flapping), enter delays, hold -> release, settings validation."""

from __future__ import annotations

import pytest

from engine.polite.policy import PolicyMemory, RuleMemory, decide, step_rule
from engine.polite.readings import Reading
from engine.polite.settings import PolicyError, PolicySettings

CPU = PolicySettings(
    cpu_busy_percent=50.0, enter_seconds=3.0, resume_after_seconds=10.0, hysteresis_margin=10.0
)


def run(settings, samples, *, on_cpu=True):
    """Feed (time, {reading name: value}) samples through decide; returns the decisions."""
    memory, decisions = PolicyMemory(), []
    for now, values in samples:
        readings = {name: Reading(name, value) for name, value in values.items()}
        memory, decision = decide(memory, readings, settings, now, hosting_on_cpu=on_cpu)
        decisions.append(decision)
    return decisions


def test_a_short_spike_does_not_pause_a_sustained_load_does():
    spike = run(CPU, [(0, {"cpu": 90}), (1, {"cpu": 90}), (2, {"cpu": 10}), (3, {"cpu": 90})])
    assert not any(d.pause for d in spike)
    sustained = run(CPU, [(t, {"cpu": 90}) for t in range(5)])
    assert [d.pause for d in sustained] == [False, False, False, True, True]
    assert sustained[-1].reason == "cpu_busy" and "90%" in sustained[-1].message
    assert not sustained[-1].release  # CPU contention: keep the weights (a short pause)


def test_hovering_at_the_threshold_never_flaps():
    # Paused at t=3; then the load hovers between threshold - margin and the threshold: stays paused.
    samples = [(t, {"cpu": 80}) for t in range(4)] + [(t, {"cpu": 45 if t % 2 else 55}) for t in range(4, 60)]
    decisions = run(CPU, samples)
    assert all(d.pause for d in decisions[3:])
    # Below threshold - margin for resume_after_seconds: resumes once, and stays resumed.
    tail = run(CPU, samples + [(t, {"cpu": 30}) for t in range(60, 75)])
    changes = [i for i in range(1, len(tail)) if tail[i].pause != tail[i - 1].pause]
    assert len(changes) == 2 and tail[changes[1]].pause is False
    assert changes[1] == len(samples) + 10  # exactly resume_after_seconds after the load cleared


def test_unpaused_load_in_the_band_does_not_pause():
    assert not any(d.pause for d in run(CPU, [(t, {"cpu": 45 if t % 2 else 50}) for t in range(30)]))


def test_cpu_rule_applies_only_when_hosting_on_the_cpu():
    assert not any(d.pause for d in run(CPU, [(t, {"cpu": 99}) for t in range(10)], on_cpu=False))


def test_game_rules_pause_and_free_memory_and_the_first_active_rule_is_the_reason():
    settings = PolicySettings(exclusive_apps=("eldenring",), enter_seconds=2.0)
    decisions = run(settings, [(0, {"fullscreen": 1.0, "exclusive_app": 1.0}), (2, {"fullscreen": 1.0})])
    assert decisions[0].pause and decisions[0].reason == "exclusive_app"  # no enter delay for a listed app
    assert decisions[0].release
    assert decisions[1].active == ("exclusive_app", "fullscreen")


def test_a_long_hold_turns_into_a_release():
    settings = PolicySettings(pause_on_battery=True, enter_seconds=0.0, hold_seconds=60.0)
    decisions = run(settings, [(0, {"battery": 1.0}), (59, {"battery": 1.0}), (60, {"battery": 1.0})])
    assert [d.release for d in decisions] == [False, False, True]


def test_unsupported_and_failed_readings_never_pause_and_never_unpause():
    settings = PolicySettings(enter_seconds=0.0, resume_after_seconds=5.0)
    memory, decision = decide(
        PolicyMemory(), {"gpu": Reading("gpu", None, unsupported="no driver")}, settings, 0
    )
    assert not decision.pause
    memory, decision = decide(memory, {"gpu": Reading("gpu", 90.0)}, settings, 1)
    assert decision.pause
    for now in range(2, 20):  # a detector that fails to read keeps the pause (and starts no clear timer)
        memory, decision = decide(memory, {"gpu": Reading("gpu", None, detail="read failed")}, settings, now)
        assert decision.pause


def test_turning_a_rule_off_clears_it_at_once():
    memory, decision = decide(
        PolicyMemory(), {"battery": Reading("battery", 1.0)}, PolicySettings(enter_seconds=0), 0
    )
    assert decision.pause
    _, decision = decide(
        memory, {"battery": Reading("battery", 1.0)}, PolicySettings(pause_on_battery=False), 1
    )
    assert not decision.pause


def test_schedule_pause_says_until_when():
    settings = PolicySettings(schedule=("mon 18:00-23:00",))
    reading = Reading("schedule", 1.0, until=1234.0)
    _, decision = decide(PolicyMemory(), {"schedule": reading}, settings, 0)
    assert decision.pause and decision.reason == "schedule" and decision.until == 1234.0


def test_step_rule_band_keeps_state():
    active = RuleMemory(active=True, on_since=0.0)
    assert step_rule(active, "band", 5.0, 3.0, 10.0).active
    assert not step_rule(RuleMemory(), "band", 5.0, 3.0, 10.0).active


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"gpu_busy_percent": 0}, "gpu_busy_percent must be between 1 and 100"),
        ({"max_gpu_temperature": 300}, "max_gpu_temperature"),
        ({"resume_after_seconds": -1}, "resume_after_seconds"),
        ({"schedule": ["someday 10:00-11:00"]}, "cannot read schedule entry"),
        ({"schedule": "mon 10:00-11:00"}, "must be a list"),
        ({"pause_on_fulscreen": True}, "unknown policy setting"),
    ],
)
def test_bad_settings_get_clear_errors(data, message):
    with pytest.raises(PolicyError, match=message):
        PolicySettings.from_dict(data)


def test_settings_round_trip():
    settings = PolicySettings(exclusive_apps=("steam*", "game.exe"), schedule=("sat 00:00-24:00",))
    assert PolicySettings.from_dict(settings.to_dict()) == settings
