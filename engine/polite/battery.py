"""On battery? (psutil.sensors_battery): a laptop's fans and charge are the owner's, not the swarm's."""

from __future__ import annotations

from collections.abc import Callable

from engine.polite.readings import Reading, unsupported

NAME = "battery"


def battery_reading(battery) -> Reading:
    """From a psutil battery record (percent, secsleft, power_plugged) or None (no battery)."""
    if battery is None:
        return Reading(NAME, 0.0, detail="no battery")
    if battery.power_plugged is None:  # the OS knows the charge but not the plug
        return Reading(NAME, None, detail=f"{battery.percent:.0f}%, power source unknown")
    on_battery = not battery.power_plugged
    return Reading(NAME, 1.0 if on_battery else 0.0, detail=f"{battery.percent:.0f}%")


def _psutil_battery():
    import psutil

    if not hasattr(psutil, "sensors_battery"):
        raise NotImplementedError("psutil cannot read batteries on this platform")
    return psutil.sensors_battery()


class BatteryDetector:
    """1.0 while running on battery, 0.0 on mains power or without a battery."""

    name = NAME

    def __init__(self, source: Callable[[], object] | None = None):
        self.source = source or _psutil_battery

    def read(self) -> Reading:
        try:
            return battery_reading(self.source())
        except (ImportError, NotImplementedError) as exc:
            return unsupported(NAME, str(exc))
        except Exception as exc:
            return Reading(NAME, None, detail=f"could not read the battery ({exc})")
