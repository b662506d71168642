"""Seconds since the user last touched keyboard or mouse, from the OS (for "share only while I am away").

Linux/X11: `xprintidle`; Windows: GetLastInputInfo; macOS: HIDIdleTime from `ioreg`. Elsewhere (a headless
server, Wayland without an idle tool, WSL2) the detector says it is unsupported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

from engine.polite.readings import Reading, unsupported

NAME = "user_idle"


class Unsupported(Exception):
    """Idle time cannot be read here; the message says why."""


def parse_xprintidle(output: str) -> float:
    """`xprintidle` prints milliseconds."""
    return int(output.strip()) / 1000.0


def parse_ioreg(output: str) -> float:
    """`ioreg -c IOHIDSystem -d 4` holds "HIDIdleTime" = <nanoseconds>."""
    match = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', output)
    if match is None:
        raise Unsupported("macOS did not report HIDIdleTime")
    return int(match.group(1)) / 1e9


def windows_idle_seconds(tick_now_ms: int, last_input_ms: int) -> float:
    """GetTickCount minus LASTINPUTINFO.dwTime, both 32-bit milliseconds that wrap after 49.7 days."""
    return ((tick_now_ms - last_input_ms) & 0xFFFFFFFF) / 1000.0


def _run(command: list[str], env=None) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=2.0, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unsupported(f"{command[0]} failed ({exc})") from None
    if result.returncode != 0:
        raise Unsupported(f"{command[0]} failed ({result.stderr.strip()[:120]})")
    return result.stdout


def platform_idle_seconds(platform: str | None = None, environ=None) -> float:  # pragma: no cover - per OS
    """Idle seconds on this machine; raises Unsupported with a sentence where it cannot be read."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    if platform.startswith("win"):
        import ctypes
        from ctypes import wintypes

        class LastInputInfo(ctypes.Structure):
            _fields_ = [("cbSize", wintypes.UINT), ("dwTime", wintypes.DWORD)]

        info = LastInputInfo(cbSize=ctypes.sizeof(LastInputInfo))
        if not ctypes.windll.user32.GetLastInputInfo(ctypes.byref(info)):
            raise Unsupported("GetLastInputInfo failed")
        return windows_idle_seconds(ctypes.windll.kernel32.GetTickCount(), info.dwTime)
    if platform == "darwin":
        return parse_ioreg(_run(["ioreg", "-c", "IOHIDSystem", "-d", "4"]))
    if not environ.get("DISPLAY"):
        raise Unsupported("no X11 session to read the idle time from (Wayland or headless)")
    if shutil.which("xprintidle") is None:
        raise Unsupported("needs the xprintidle tool")
    env = {"DISPLAY": environ["DISPLAY"], "PATH": environ.get("PATH", "/usr/bin:/bin")}
    return parse_xprintidle(_run(["xprintidle"], env))


class IdleDetector:
    """Seconds since the last keyboard or mouse input."""

    name = NAME

    def __init__(self, source: Callable[[], float] | None = None):
        self.source = source or platform_idle_seconds

    def read(self) -> Reading:
        try:
            return Reading(NAME, float(self.source()))
        except Unsupported as exc:
            return unsupported(NAME, str(exc))
        except Exception as exc:
            return Reading(NAME, None, detail=f"could not read the idle time ({exc})")
