"""Conversations and settings of the desktop app, kept in SQLite (standard library).

One file, ``conversations.sqlite3``, in the per-user data directory (``OURO_MLX_APP_DIR``
overrides it). The schema carries its version from the first release: a newer file is
refused in one line instead of being misread. The file is the user's, but it is read as
untrusted: a row or setting of the wrong type is skipped with a warning that names it
(and left in the file, never deleted); a malformed token list is shown as plain text.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


KIND_NAMES = {str: "text", bool: "true or false", int: "a whole number",
              float: "a number", list: "a list", dict: "an object"}


def show(value) -> str:
    """A stored column value as a warning names it (short)."""
    if value is None:
        return "empty (NULL)"
    if isinstance(value, bytes):
        return f"binary ({len(value)} bytes)"
    return repr(value)[:40]


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


def json_kind(value) -> str:
    """How a JSON value reads to a user: 'the number 123', 'a list', ..."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object"


LAST_TIME = 253402300799  # 9999-12-31: what the calendar functions take


def is_time(value) -> bool:
    """A Unix time that can be shown as a date."""
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= LAST_TIME


class Store:
    """The app's SQLite file: conversations with their messages, and settings.

    Damaged rows and settings are skipped, never deleted; each is named once in
    ``warnings`` (and passed to ``on_warning``, e.g. to print it)."""

    def __init__(self, path: str | Path | None = None,
                 on_warning: Callable[[str], None] | None = None):
        self.path = Path(path) if path is not None else data_dir() / DB_NAME
        self.warnings: list[str] = []
        self.on_warning = on_warning
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

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            if self.on_warning is not None:
                self.on_warning(text)

    def read(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a query; a file whose tables are not what this version wrote is
        refused in one line."""
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise ValueError(
                f"{self.path}: not a readable conversation store ({e}).") from None

    # conversations
    def new_conversation(self, title: str = "New conversation", model: str = "") -> int:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO conversations (title, model, created, updated) VALUES (?,?,?,?)",
                (title, model, now, now))
        return int(cur.lastrowid)

    def conversations(self) -> list[Conversation]:
        """All readable conversations, the most recently updated first."""
        out = []
        for i, title, model, updated in self.read(
                "SELECT id, title, model, updated FROM conversations"
                " ORDER BY updated DESC, id DESC"):
            if not isinstance(title, str) or not is_time(updated):
                what = "title" if not isinstance(title, str) else "time"
                self.warn(f"{self.path}: conversation {i} skipped (its {what} is "
                          f"{show(title if what == 'title' else updated)}).")
                continue
            out.append(Conversation(int(i), title, model if isinstance(model, str) else "",
                                    float(updated)))
        return out

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
        """The readable messages of a conversation, in order."""
        out = []
        for i, role, content, pieces, finish in self.read(
                "SELECT id, role, content, pieces, finish FROM messages"
                " WHERE conversation_id = ? ORDER BY id", (conversation_id,)):
            if role not in ("user", "assistant") or not isinstance(content, str):
                what = f"role is {show(role)}" if role not in ("user", "assistant") \
                    else f"text is {show(content)}"
                self.warn(f"{self.path}: message {i} of conversation {conversation_id} "
                          f"skipped (its {what}).")
                continue
            out.append(Message(role, content, parse_pieces(pieces) if role == "assistant"
                               and isinstance(pieces, str) else [],
                               finish if isinstance(finish, str) else ""))
        return out

    # settings (JSON values)
    def setting(self, key: str, default=None, kind: type | tuple | None = None):
        """A stored setting; ``default`` when it is missing, or (with a warning) not
        JSON or not of ``kind``."""
        rows = self.read("SELECT value FROM settings WHERE key = ?", (key,))
        if not rows:
            return default
        try:
            value = json.loads(rows[0][0])
        except (ValueError, TypeError, RecursionError):
            self.warn(f"{self.path}: setting {key!r} ignored (not readable).")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int to isinstance; a stored true is not a number here
        if kind is not None and type(value) not in kinds:
            names = " or ".join(KIND_NAMES.get(k, k.__name__) for k in kinds)
            self.warn(f"{self.path}: setting {key!r} ignored (it is {json_kind(value)}; "
                      f"expected {names}).")
            return default
        return value

    def set_setting(self, key: str, value) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                            (key, json.dumps(value)))
