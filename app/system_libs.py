"""Check, before Qt loads, that the system libraries its X11 (xcb) platform plugin needs are installed.

Without them Qt prints one line ("could not load the Qt platform plugin xcb") and no window opens; this
names the missing libraries and the command that installs them. Standard library only (Qt is not loaded).
`python -m app.system_libs` exits 1 with the advice when something is missing (./dev.sh app runs it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Library file -> Debian/Ubuntu package; Qt's xcb plugin links most of these and loads xcb-cursor at run time.
DEBIAN_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libdbus-1.so.3": "libdbus-1-3",
}
LOADED_AT_RUN_TIME = ("libxcb-cursor.so.0",)  # not in ldd's list: Qt 6.5+ dlopens it


def missing_libraries(plugin_dir: Path | None = None) -> list[str]:
    """Library files Qt's xcb plugin needs that this system lacks ([] when unknown or not applicable)."""
    plugin_dir = plugin_dir or _pyside_dir()
    if plugin_dir is None or not shutil.which("ldd"):
        return []
    missing: list[str] = []
    for binary in (plugin_dir / "plugins/platforms/libqxcb.so", plugin_dir / "lib/libQt6XcbQpa.so.6"):
        if not binary.exists():
            continue
        try:
            output = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        for line in output.splitlines():
            if "not found" in line:
                name = line.split("=>")[0].strip()
                if name not in missing:
                    missing.append(name)
    for name in LOADED_AT_RUN_TIME:
        if name not in missing and not _installed(name):
            missing.append(name)
    return missing


def _installed(library: str) -> bool:
    try:
        output = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: do not claim it is missing
    return library in output


def _pyside_dir() -> Path | None:
    spec = importlib.util.find_spec("PySide6")  # finds the package without loading Qt
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "Qt"


def advice(missing: list[str]) -> str:
    """What to tell a person: the missing libraries and the exact command that installs them."""
    packages = [DEBIAN_PACKAGES.get(name, name) for name in missing]
    return (
        "The desktop app cannot open a window: Qt's X11 support needs system libraries that are missing:\n"
        f"  {', '.join(missing)}\n"
        "Install them (Debian/Ubuntu), then run ./dev.sh app again:\n"
        f"  sudo apt-get install {' '.join(packages)}\n"
        "(Fedora: sudo dnf install xcb-util-cursor xcb-util-wm xcb-util-keysyms xcb-util-image "
        "xcb-util-renderutil libxkbcommon-x11)"
    )


def applies() -> bool:
    """Only Linux desktops that use X11 (the default there) need these; offscreen/wayland runs do not."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    return sys.platform.startswith("linux") and platform in ("", "xcb") and bool(os.environ.get("DISPLAY"))


def main() -> int:
    if not applies():
        return 0
    missing = missing_libraries()
    if missing:
        print(advice(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
