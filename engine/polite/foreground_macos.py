"""The foreground window on macOS, through Quartz's window list (pyobjc-framework-Quartz, when installed):
an application window at the normal layer that covers a whole display counts as full screen.
"""

from __future__ import annotations

import sys

from engine.polite.foreground import Foreground, Unsupported

# Menu bar, Dock and other system windows: drawn over full-screen apps, never "the foreground app".
SYSTEM_OWNERS = frozenset(
    {"Window Server", "Dock", "SystemUIServer", "Control Center", "Notification Center"}
)


def fullscreen_app(windows: list[dict], displays: list[tuple[float, float, float, float]]) -> Foreground:
    """From CGWindowListCopyWindowInfo records (front to back) and display bounds (x, y, width, height)."""
    for window in windows:
        owner = str(window.get("kCGWindowOwnerName", ""))
        if window.get("kCGWindowLayer", 0) != 0 or owner in SYSTEM_OWNERS:
            continue
        bounds = window.get("kCGWindowBounds") or {}
        rect = (bounds.get("X", 0), bounds.get("Y", 0), bounds.get("Width", 0), bounds.get("Height", 0))
        covers = any(
            rect[0] <= d[0]
            and rect[1] <= d[1]
            and rect[0] + rect[2] >= d[0] + d[2]
            and rect[1] + rect[3] >= d[1] + d[3]
            for d in displays
        )
        return Foreground(app=owner, fullscreen=covers)  # the frontmost application window decides
    return Foreground(app="", fullscreen=False)


def probe() -> Foreground:  # pragma: no cover - needs macOS
    """The frontmost application window of this macOS session."""
    if sys.platform != "darwin":
        raise Unsupported("the macOS window list is visible only on macOS")
    try:
        import Quartz
    except ImportError:
        raise Unsupported("needs pyobjc-framework-Quartz to see the foreground window") from None
    options = Quartz.kCGWindowListOptionOnScreenOnly | Quartz.kCGWindowListExcludeDesktopElements
    windows = [dict(w) for w in Quartz.CGWindowListCopyWindowInfo(options, Quartz.kCGNullWindowID) or []]
    ids = Quartz.CGGetActiveDisplayList(16, None, None)[1] or []
    displays = []
    for display in ids:
        b = Quartz.CGDisplayBounds(display)
        displays.append((b.origin.x, b.origin.y, b.size.width, b.size.height))
    return fullscreen_app(windows, displays)
