"""Every store survives: one that cannot be read is renamed aside, a fresh one starts, and the user hears.

One helper for every store of both processes (ledger, chat history, settings, engine state, prepared
models). `open_store(path, opener, store=..., notices=...)` calls `opener(path)`; if that raises an error
that means "damaged" (bad JSON, too deeply nested, a folder where a file should be, not a database...), the
path is renamed to `<name>.corrupt-<UTC time>` next to it, the event is added to `set-aside.json` in the data
directory, and `opener` runs again on the now empty place. The app reads `set-aside.json` and tells the user
what was set aside and where (`pending`, then `acknowledge`). Standard library only: the app uses it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from contract.names import SET_ASIDE_FILE

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What "this store is damaged" looks like. Not PermissionError or a full disk: those are no corruption, and
# moving the file would not help.
DAMAGED = (
    ValueError,  # bad JSON (JSONDecodeError), wrong format, checksum mismatch, bad values
    TypeError,
    KeyError,
    AttributeError,  # JSON of the wrong shape ([] where {} was expected)
    RecursionError,  # deeply nested JSON
    IsADirectoryError,
    NotADirectoryError,
    UnicodeError,
    sqlite3.DatabaseError,  # not a database, malformed pages, wrong schema
)
MAX_NOTICES = 50


@dataclass(frozen=True)
class SetAside:
    """One store that was found damaged and renamed aside."""

    store: str  # what it is, for people: "chat history", "contribution ledger", ...
    path: str  # where it was
    moved_to: str  # where it is now
    reason: str  # what was wrong with it
    at: float  # when (seconds since the epoch)
    acknowledged: bool = False  # the app told the user

    def message(self) -> str:
        """One sentence for the user."""
        return (
            f"Your {self.store} could not be read ({self.reason}), so Pollinate started a new one. "
            f"The old file was kept as {self.moved_to}."
        )


def aside_name(path: Path, now: float) -> Path:
    """`<name>.corrupt-<UTC time>` next to `path`, numbered if that name is taken."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists() or target.is_symlink():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    return target


def set_aside(
    path: Path,
    *,
    store: str,
    reason: str,
    notices: Path | None = None,
    now: float | None = None,
    companions: tuple[str, ...] = (),
) -> SetAside:
    """Rename `path` (a file or a folder) aside and record it in `notices`/set-aside.json; returns the record.

    `companions` are suffixes of files that belong to the store (SQLite's "-wal", "-shm", "-journal"): they
    move along with it.
    """
    path = Path(path)
    now = time.time() if now is None else now
    target = aside_name(path, now)
    os.replace(path, target)
    for suffix in companions:
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            with contextlib.suppress(OSError):
                os.replace(companion, target.with_name(target.name + suffix))
    record = SetAside(store, str(path), str(target), _short(reason), now)
    logger.warning("%s %s was damaged (%s): set aside as %s, starting a new one", store, path, reason, target)
    if notices is not None:
        _add_notice(Path(notices), record)
    return record


def open_store(
    path: Path,
    opener: Callable[[Path], T],
    *,
    store: str,
    notices: Path | None,
    damaged: tuple[type[BaseException], ...] = DAMAGED,
    companions: tuple[str, ...] = (),
) -> tuple[T, SetAside | None]:
    """`opener(path)`; if it finds the store damaged, set the store aside and open a fresh one.

    Returns what `opener` returned and the SetAside record (None when the store was fine). An error the
    fresh store raises too (no room, no permission) is the caller's.
    """
    path = Path(path)
    try:
        return opener(path), None
    except damaged as error:
        if not (path.exists() or path.is_symlink()):
            raise  # nothing to set aside: the error is not the store's
        record = set_aside(path, store=store, reason=_describe(error), notices=notices, companions=companions)
    return opener(path), record


def pending(notices: Path) -> list[SetAside]:
    """Set-aside events the user has not been told about yet (oldest first)."""
    return [record for record in _read(Path(notices)) if not record.acknowledged]


def acknowledge(notices: Path, records: list[SetAside]) -> None:
    """Mark `records` as told to the user."""
    told = {(r.path, r.moved_to) for r in records}
    all_records = [
        SetAside(**{**asdict(r), "acknowledged": True}) if (r.path, r.moved_to) in told else r
        for r in _read(Path(notices))
    ]
    _write(Path(notices), all_records)


def _describe(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if isinstance(error, IsADirectoryError):
        return "a folder where a file should be"
    if isinstance(error, NotADirectoryError):
        return "a file where a folder should be"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if isinstance(error, sqlite3.Error) else text


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _file(notices: Path) -> Path:
    return notices / SET_ASIDE_FILE


def _read(notices: Path) -> list[SetAside]:
    try:
        raw = json.loads(_file(notices).read_text(encoding="utf-8"))
        return [SetAside(**entry) for entry in raw if isinstance(entry, dict)]
    except (OSError, *DAMAGED):
        return []  # the notices are a courtesy: never a reason to fail


def _write(notices: Path, records: list[SetAside]) -> None:
    path = _file(notices)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps([asdict(r) for r in records[-MAX_NOTICES:]], indent=1))
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("could not record the set-aside store in %s: %s", path, error)


def _add_notice(notices: Path, record: SetAside) -> None:
    path = _file(notices)
    if path.exists() and not path.is_file():
        with contextlib.suppress(OSError):  # the notices file itself damaged: it is only a courtesy
            os.replace(path, aside_name(path, record.at))
    _write(notices, [*_read(notices), record])
