"""The foreground window on Windows (ctypes, user32/shell32): full screen when it covers its monitor, or
when the shell says a full-screen Direct3D application or a presentation is running.

The engine usually runs inside WSL2 on Windows, where this part cannot see the desktop and says so.
"""

from __future__ import annotations

import sys

from engine.polite.foreground import Foreground, Unsupported

# SHQueryUserNotificationState results (shellapi.h QUERY_USER_NOTIFICATION_STATE)
QUNS_BUSY = 2  # a full-screen application is running
QUNS_RUNNING_D3D_FULL_SCREEN = 3
QUNS_PRESENTATION_MODE = 4
FULLSCREEN_STATES = (QUNS_BUSY, QUNS_RUNNING_D3D_FULL_SCREEN, QUNS_PRESENTATION_MODE)


def covers_monitor(window: tuple[int, int, int, int], monitor: tuple[int, int, int, int]) -> bool:
    """Whether a window rectangle (left, top, right, bottom) covers the whole monitor rectangle."""
    return (
        window[0] <= monitor[0]
        and window[1] <= monitor[1]
        and window[2] >= monitor[2]
        and window[3] >= monitor[3]
    )


def is_fullscreen(notification_state: int | None, window, monitor, is_desktop: bool) -> bool:
    """The decision from what the shell and the window say (the desktop itself covers its monitor too)."""
    if notification_state in FULLSCREEN_STATES:
        return True
    return window is not None and monitor is not None and not is_desktop and covers_monitor(window, monitor)


def probe() -> Foreground:  # pragma: no cover - needs a Windows desktop
    """The foreground window of this Windows session."""
    if not sys.platform.startswith("win"):
        raise Unsupported("the Windows foreground window is visible only to a native Windows process")
    import ctypes
    from ctypes import wintypes

    user32, shell32 = ctypes.windll.user32, ctypes.windll.shell32
    state = ctypes.c_int(0)
    notification = state.value if shell32.SHQueryUserNotificationState(ctypes.byref(state)) == 0 else None
    hwnd = user32.GetForegroundWindow()
    if not hwnd:
        return Foreground(app="", fullscreen=notification in FULLSCREEN_STATES)
    rect = wintypes.RECT()
    user32.GetWindowRect(hwnd, ctypes.byref(rect))

    class MonitorInfo(ctypes.Structure):
        _fields_ = [("cbSize", wintypes.DWORD), ("rcMonitor", wintypes.RECT), ("rcWork", wintypes.RECT),
                    ("dwFlags", wintypes.DWORD)]  # fmt: skip

    info = MonitorInfo(cbSize=ctypes.sizeof(MonitorInfo))
    user32.GetMonitorInfoW(user32.MonitorFromWindow(hwnd, 2), ctypes.byref(info))  # 2: nearest monitor
    pid = wintypes.DWORD()
    user32.GetWindowThreadProcessId(hwnd, ctypes.byref(pid))
    is_desktop = hwnd in (user32.GetDesktopWindow(), user32.GetShellWindow())
    app = _process_name(pid.value)
    window = (rect.left, rect.top, rect.right, rect.bottom)
    m = info.rcMonitor
    return Foreground(
        app, is_fullscreen(notification, window, (m.left, m.top, m.right, m.bottom), is_desktop)
    )


def _process_name(pid: int) -> str:  # pragma: no cover - Windows only
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:
        return f"pid {pid}"
