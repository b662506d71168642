"""The foreground window on Linux/X11, through `xprop` (x11-utils): EWMH _NET_ACTIVE_WINDOW and its state.

Wayland gives applications no view of other windows, so on a pure Wayland session this part says it is
unsupported (X11 games running through XWayland are still seen when DISPLAY is set).
"""

from __future__ import annotations

import re
import shutil
import subprocess

from engine.polite.foreground import Foreground, Unsupported

TIMEOUT = 2.0


def parse_active_window(output: str) -> str | None:
    """The window id from `xprop -root _NET_ACTIVE_WINDOW`, or None (no window has the focus)."""
    match = re.search(r"window id # (0x[0-9a-fA-F]+)", output)
    if match is None or int(match.group(1), 16) == 0:
        return None
    return match.group(1)


def parse_window(output: str) -> Foreground:
    """Application name and full-screen state from `xprop -id W _NET_WM_STATE WM_CLASS`."""
    fullscreen = bool(re.search(r"_NET_WM_STATE\(ATOM\) =.*_NET_WM_STATE_FULLSCREEN", output))
    names = re.search(r'WM_CLASS\(STRING\) = "([^"]*)"(?:, "([^"]*)")?', output)
    app = (names.group(2) or names.group(1)) if names else "unknown window"
    return Foreground(app=app, fullscreen=fullscreen)


def probe(environ) -> Foreground:
    """The foreground window of the X11 display in `environ`; raises Unsupported where there is none."""
    display = environ.get("DISPLAY")
    if not display:
        if environ.get("WAYLAND_DISPLAY"):
            raise Unsupported("Wayland does not let applications see other windows")
        raise Unsupported("no graphical session (no DISPLAY)")
    xprop = shutil.which("xprop")
    if xprop is None:
        raise Unsupported("needs the xprop tool (package x11-utils)")
    env = {"DISPLAY": display, "PATH": environ.get("PATH", "/usr/bin:/bin")}
    root = _run([xprop, "-root", "_NET_ACTIVE_WINDOW"], env)
    window = parse_active_window(root)
    if window is None:
        return Foreground(app="", fullscreen=False)
    return parse_window(_run([xprop, "-id", window, "_NET_WM_STATE", "WM_CLASS"], env))


def _run(command: list[str], env: dict) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unsupported(f"xprop failed ({exc})") from None
    if result.returncode != 0:
        raise Unsupported(f"cannot reach the X display ({result.stderr.strip()[:120]})")
    return result.stdout
