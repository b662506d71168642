"""Is a full-screen application (a game, a video) in the foreground? One detector, a platform part each.

The platform parts (foreground_x11, foreground_windows, foreground_macos) each give `probe() ->
Foreground` or raise Unsupported with a sentence for Settings; this module picks the one for this machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from engine.polite.readings import Reading, unsupported

NAME = "fullscreen"


class Unsupported(Exception):
    """This platform part cannot see the foreground window here; the message says why, for a person."""


@dataclass(frozen=True)
class Foreground:
    """The foreground window: which application owns it, and whether it covers its whole screen."""

    app: str
    fullscreen: bool


def platform_probe(platform: str | None = None, environ=None) -> Callable[[], Foreground]:
    """The probe for this platform; its call raises Unsupported where it cannot work."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    if platform.startswith("win"):
        from engine.polite import foreground_windows

        return foreground_windows.probe
    if platform == "darwin":
        from engine.polite import foreground_macos

        return foreground_macos.probe
    from engine.polite import foreground_x11

    return lambda: foreground_x11.probe(environ)


class FullscreenDetector:
    """1.0 while a full-screen application has the foreground (detail: its name), else 0.0."""

    name = NAME

    def __init__(self, probe: Callable[[], Foreground] | None = None):
        self.probe = probe or platform_probe()

    def read(self) -> Reading:
        try:
            window = self.probe()
        except Unsupported as exc:
            return unsupported(NAME, str(exc))
        except Exception as exc:  # a probe that broke in an unexpected way: say so, do not pause
            return Reading(NAME, None, detail=f"could not read the foreground window ({exc})")
        return Reading(NAME, 1.0 if window.fullscreen else 0.0, detail=window.app)
