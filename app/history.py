"""Chat history on disk: conversations and their messages in one SQLite file under the data dir."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from contract.stores import SetAside, open_store

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    tokens INTEGER,
    seconds REAL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""
COLUMNS = {
    "conversations": {"id", "title", "model", "system_prompt", "created", "updated"},
    "messages": {"id", "conversation_id", "role", "content", "created", "tokens", "seconds"},
}
# Columns added after the first release: (name, declaration); added to older files on open.
ADDED_COLUMNS = {
    "conversations": (
        ("temperature", "REAL"),  # the conversation's own options (NULL: the defaults)
        ("top_p", "REAL"),
        ("max_tokens", "INTEGER"),
    ),
}
SIDECARS = ("-journal", "-wal", "-shm")  # SQLite's files beside the database move aside with it


def _connect(path: Path) -> sqlite3.Connection:
    """A connection to a sound history database at `path` (made if missing); sqlite3.DatabaseError if not.

    Checked at open, so that a damaged file is found now and not when a chat opens: not a database,
    damaged pages (quick_check), or tables of another shape.
    """
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        verdict = db.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"damaged database: {verdict}")
        db.executescript(SCHEMA)
        for table, expected in COLUMNS.items():
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if not expected <= columns:
                raise sqlite3.DatabaseError(f"table {table} lacks {', '.join(sorted(expected - columns))}")
        for table, added in ADDED_COLUMNS.items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in added:
                if name not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
        db.commit()
    except sqlite3.OperationalError as error:
        db.close()
        if "locked" in str(error) or "busy" in str(error):
            raise RuntimeError(f"the chat history {path} is in use by another program: {error}") from None
        raise
    except BaseException:
        db.close()
        raise
    return db


@dataclass(frozen=True)
class Conversation:
    """One chat thread."""

    id: int
    title: str
    model: str
    system_prompt: str
    updated: float
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Message:
    """One turn; `tokens`/`seconds` are set for assistant replies (for tokens/s)."""

    id: int
    role: str
    content: str
    tokens: int | None = None
    seconds: float | None = None


CONVERSATION_COLUMNS = "id, title, model, system_prompt, updated, temperature, top_p, max_tokens"


class ChatHistory:
    """Conversations stored in SQLite; every write is committed at once so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self.set_aside: SetAside | None = None  # a damaged history found at open, renamed aside

    def open(self) -> ChatHistory:
        """Open (or create) the database; a damaged one is set aside (`self.set_aside`) and a new one made."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db, self.set_aside = open_store(
            self.path, _connect, store="chat history", notices=self.path.parent, companions=SIDECARS
        )
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self.db:
            cursor = self.db.execute(sql, args)
        return cursor.lastrowid or 0

    def create_conversation(self, title: str = "New chat", model: str = "", system_prompt: str = "") -> int:
        now = time.time()
        return self._write(
            "INSERT INTO conversations (title, model, system_prompt, created, updated)"
            " VALUES (?, ?, ?, ?, ?)",
            (title, model, system_prompt, now, now),
        )

    def conversations(self) -> list[Conversation]:
        """All conversations, most recently updated first."""
        rows = self.db.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations ORDER BY updated DESC, id DESC"
        )
        return [Conversation(*row) for row in rows]

    def conversation(self, conversation_id: int) -> Conversation | None:
        row = self.db.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?",
            (conversation_id,),
        ).fetchone()
        return Conversation(*row) if row else None

    def rename(self, conversation_id: int, title: str) -> None:
        self._write(
            "UPDATE conversations SET title = ? WHERE id = ?", (title.strip() or "Untitled", conversation_id)
        )

    def update_conversation(
        self, conversation_id: int, *, model: str | None = None, system_prompt: str | None = None
    ):
        if model is not None:
            self._write("UPDATE conversations SET model = ? WHERE id = ?", (model, conversation_id))
        if system_prompt is not None:
            self._write(
                "UPDATE conversations SET system_prompt = ? WHERE id = ?", (system_prompt, conversation_id)
            )

    def set_options(self, conversation_id: int, temperature: float, top_p: float, max_tokens: int) -> None:
        """Save the conversation's sampling options (used again when it is reopened)."""
        self._write(
            "UPDATE conversations SET temperature = ?, top_p = ?, max_tokens = ? WHERE id = ?",
            (temperature, top_p, max_tokens, conversation_id),
        )

    def delete_message(self, message_id: int) -> None:
        self._write("DELETE FROM messages WHERE id = ?", (message_id,))

    def delete(self, conversation_id: int) -> None:
        self._write("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, role, content, tokens, seconds FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        )
        return [Message(*row) for row in rows]

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        tokens: int | None = None,
        seconds: float | None = None,
    ) -> int:
        now = time.time()
        message_id = self._write(
            "INSERT INTO messages (conversation_id, role, content, created, tokens, seconds)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, role, content, now, tokens, seconds),
        )
        self._write("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        return message_id
