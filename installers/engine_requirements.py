"""Print the run-time requirements of a Pollinate wheel, one per line, leaving out the named packages.

The engine's virtual environments need no Qt (the app is a bundle of its own) and, on macOS, no
bitsandbytes; the wheel lists the needs of both parts. Installers install these lines, then the wheel with
`--no-deps`. Standard library only: it runs with whatever Python the installer found.

    python engine_requirements.py pollinate-0.1.0-py3-none-any.whl PySide6-Essentials [more names...]
"""

from __future__ import annotations

import re
import sys
import zipfile


def requirements(wheel: str, leave_out: list[str]) -> list[str]:
    """Requires-Dist lines of the wheel (no extras), minus the packages named in leave_out."""
    skip = {re.sub(r"[-_.]+", "-", name).lower() for name in leave_out}
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode("utf-8").splitlines()
    kept = []
    for line in lines:
        if not line.startswith("Requires-Dist:") or "extra ==" in line:
            continue
        requirement = line.split(":", 1)[1].strip()
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
        if re.sub(r"[-_.]+", "-", name).lower() not in skip:
            kept.append(requirement)
    return kept


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
