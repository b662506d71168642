"""Start at login (opt-in): XDG autostart entry on Linux, HKCU Run key on Windows, LaunchAgent on macOS."""

from __future__ import annotations

import contextlib
import os
import plistlib
import shlex
import sys
from pathlib import Path

ENTRY_NAME = "pollinate"
LAUNCH_AGENT_LABEL = "org.pollinate.app"
RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"


def launch_command() -> list[str]:
    """The command that starts the app the way it runs now (the same interpreter and package, or bundle)."""
    if getattr(sys, "frozen", False):  # a PyInstaller bundle: its executable is the app
        return [sys.executable, "--minimized"]
    return [sys.executable, "-m", "app", "--minimized"]


def linux_entry_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "autostart" / f"{ENTRY_NAME}.desktop"


def mac_agent_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"


def desktop_entry(command: list[str]) -> str:
    """Text of the XDG .desktop autostart entry for `command`."""
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=Pollinate\n"
        "Comment=Share your GPU with a peer-to-peer LLM swarm\n"
        f"Exec={shlex.join(command)}\n"
        "Terminal=false\n"
        "X-GNOME-Autostart-enabled=true\n"
    )


def is_enabled() -> bool:
    """Whether the app is registered to start at login."""
    if sys.platform.startswith("win"):
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key:
                winreg.QueryValueEx(key, "Pollinate")
            return True
        except OSError:
            return False
    if sys.platform == "darwin":
        return mac_agent_path().exists()
    return linux_entry_path().exists()


def set_enabled(enabled: bool, command: list[str] | None = None) -> None:
    """Register (or really remove) the start-at-login entry; raises OSError when that fails."""
    command = command or launch_command()
    if sys.platform.startswith("win"):
        import winreg

        with winreg.CreateKey(winreg.HKEY_CURRENT_USER, RUN_KEY) as key:
            if enabled:
                winreg.SetValueEx(key, "Pollinate", 0, winreg.REG_SZ, " ".join(f'"{c}"' for c in command))
            else:
                with contextlib.suppress(FileNotFoundError):
                    winreg.DeleteValue(key, "Pollinate")
        return
    path = mac_agent_path() if sys.platform == "darwin" else linux_entry_path()
    if not enabled:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform == "darwin":
        data = plistlib.dumps({"Label": LAUNCH_AGENT_LABEL, "ProgramArguments": command, "RunAtLoad": True})
        path.write_bytes(data)
    else:
        path.write_text(desktop_entry(command), encoding="utf-8")
