"""The ledger file: versioned, checksummed JSON, written atomically (Ledger.open sets a damaged one aside).

Layout: {"format": "pollinate-ledger", "version": 1, "sha256": <hex of the canonical body>, "body": {...}}.
Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the old file, so
a crash leaves either the old ledger or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = "pollinate-ledger"
VERSION = 1


class LedgerFileError(ValueError):
    """The ledger file cannot be trusted: not JSON, wrong format or version, or a checksum mismatch."""


def _canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def save(path: Path, body: dict[str, Any]) -> None:
    """Write `body` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(_canonical(body)).hexdigest(),
        "body": body,
    }
    data = json.dumps(document, sort_keys=True, allow_nan=False).encode()
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def load(path: Path) -> dict[str, Any] | None:
    """The body stored at `path`; None if there is no file; LedgerFileError if it cannot be trusted."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LedgerFileError(f"not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise LedgerFileError("not a Pollinate ledger file")
    if document.get("version") != VERSION:
        raise LedgerFileError(f"unsupported ledger version {document.get('version')!r:.20}")
    body = document.get("body")
    if not isinstance(body, dict):
        raise LedgerFileError("the ledger has no body")
    if hashlib.sha256(_canonical(body)).hexdigest() != document.get("sha256"):
        raise LedgerFileError("checksum mismatch")
    return body
