"""Exclusive applications: sharing pauses while any program on the user's list runs (BOINC's idea).

Names match a process's executable name without its extension, case-insensitively; `*` and `?` wildcards
work ("steam*", "eldenring").
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from engine.polite.readings import Reading, unsupported

NAME = "exclusive_app"


def normalize(name: str) -> str:
    """'C:\\Games\\Game.EXE' -> 'game': the program name people recognise, for matching."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip().lower()
    for suffix in (".exe", ".app", ".bin", ".x86_64"):
        base = base.removesuffix(suffix)
    return base


def running_exclusive(process_names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The listed programs among the running ones (sorted, each once)."""
    wanted = [normalize(p) for p in patterns if p and p.strip()]
    if not wanted:
        return []
    running = {normalize(n) for n in process_names if n}
    return sorted({name for name in running for pattern in wanted if fnmatch.fnmatchcase(name, pattern)})


def process_names() -> list[str]:
    """Names of the running processes (psutil); a process that ends while listed is skipped."""
    import psutil

    names = []
    for process in psutil.process_iter(["name"]):
        name = process.info.get("name")
        if name:
            names.append(name)
    return names


class ExclusiveAppDetector:
    """1.0 while a listed program runs (detail: which), else 0.0."""

    name = NAME

    def __init__(
        self, patterns: Callable[[], Iterable[str]], lister: Callable[[], Iterable[str]] | None = None
    ):
        self.patterns = patterns
        self.lister = lister or process_names

    def read(self) -> Reading:
        try:
            names = list(self.lister())
        except ImportError:
            return unsupported(NAME, "psutil is not installed")
        except Exception as exc:
            return Reading(NAME, None, detail=f"could not list processes ({exc})")
        found = running_exclusive(names, self.patterns())
        return Reading(NAME, 1.0 if found else 0.0, detail=", ".join(found))
