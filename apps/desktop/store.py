"""Conversations and settings of the desktop app, kept in SQLite (standard library).

One file, ``conversations.sqlite3``, in the per-user data directory (``OURO_MLX_APP_DIR``
overrides it). The schema carries its version from the first release: a newer file is
refused in one line instead of being misread. The file is the user's, but it is read as
untrusted: a malformed row is shown as plain text, never trusted for shapes or types.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
DB_NAME = "conversations.sqlite3"
MAX_PIECES = 1_000_000  # tokens of one stored answer (a guard against a damaged file)

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    pieces TEXT NOT NULL DEFAULT '[]',
    finish TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def data_dir() -> Path:
    """Where the app keeps its files: ``OURO_MLX_APP_DIR``, else the platform's
    per-user data directory."""
    if os.environ.get("OURO_MLX_APP_DIR"):
        return Path(os.environ["OURO_MLX_APP_DIR"]).expanduser()
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "ouro-mlx"
    base = os.environ.get("XDG_DATA_HOME") or home / ".local" / "share"
    return Path(base) / "ouro-mlx"


@dataclass
class Piece:
    """One streamed token as shown: its text, the loop steps it ran, whether it was
    thinking (inside <think>…</think>)."""

    text: str
    loops: int
    thinking: bool = False


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str  # what the model sees in the history
    pieces: list[Piece] = field(default_factory=list)  # assistant tokens, for colours
    finish: str = ""  # why the answer ended ("stop", "length", "cancelled", ...)


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    updated: float


def parse_pieces(raw: str) -> list[Piece]:
    """Stored pieces, or none when the column is not what this version writes."""
    try:
        rows = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    if not isinstance(rows, list) or len(rows) > MAX_PIECES:
        return []
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and type(row[1]) is int and row[1] >= 0 and isinstance(row[2], bool)):
            return []
        out.append(Piece(row[0], row[1], row[2]))
    return out


class Store:
    """The app's SQLite file: conversations with their messages, and settings."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else data_dir() / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a readable conversation store ({e}).") from None

    def _migrate(self) -> None:
        with self.db:
            self.db.executescript(SCHEMA)
            rows = self.db.execute("SELECT version FROM schema_version").fetchall()
            if not rows:
                self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                return
        version = rows[0][0]
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: schema version {version!r}; this ouro-mlx reads version "
                f"{SCHEMA_VERSION} (use a newer ouro-mlx, or move the file away).")

    def close(self) -> None:
        self.db.close()

    # conversations
    def new_conversation(self, title: str = "New conversation", model: str = "") -> int:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO conversations (title, model, created, updated) VALUES (?,?,?,?)",
                (title, model, now, now))
        return int(cur.lastrowid)

    def conversations(self) -> list[Conversation]:
        """All conversations, the most recently updated first."""
        rows = self.db.execute(
            "SELECT id, title, model, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(int(i), str(t), str(m), float(u)) for i, t, m, u in rows]

    def rename(self, conversation_id: int, title: str) -> None:
        with self.db:
            self.db.execute("UPDATE conversations SET title = ? WHERE id = ?",
                            (title, conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # messages
    def add_message(self, conversation_id: int, message: Message) -> None:
        pieces = json.dumps([[p.text, p.loops, p.thinking] for p in message.pieces])
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, pieces, finish, created)"
                " VALUES (?,?,?,?,?,?)",
                (conversation_id, message.role, message.content, pieces, message.finish, now))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?",
                            (now, conversation_id))

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT role, content, pieces, finish FROM messages WHERE conversation_id = ?"
            " ORDER BY id", (conversation_id,))
        out = []
        for role, content, pieces, finish in rows:
            if role not in ("user", "assistant") or not isinstance(content, str):
                continue
            out.append(Message(role, content, parse_pieces(pieces) if role == "assistant"
                               and isinstance(pieces, str) else [], str(finish or "")))
        return out

    # settings (JSON values)
    def setting(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except (ValueError, TypeError, RecursionError):
            return default

    def set_setting(self, key: str, value) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                            (key, json.dumps(value)))
