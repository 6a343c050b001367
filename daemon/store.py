"""The conversation store: SQLite in WAL mode, one transaction per write.

WAL with synchronous=NORMAL survives a kill -9 of the daemon at any point (only a power loss can
drop the last transactions). A reply that was generating when the daemon died is marked
`interrupted` at the next start, never silently dropped.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT PRIMARY KEY,
    title         TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    settings      TEXT NOT NULL DEFAULT '{}',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id              TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content         TEXT NOT NULL,
    status          TEXT NOT NULL,
    model           TEXT,
    stats           TEXT,
    error           TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, position);
"""

# complete: a finished user message or reply. generating: a reply being written right now.
# cancelled, interrupted (engine or daemon died), error: a reply that ended early; its text stays.
MESSAGE_STATUSES = ("complete", "generating", "cancelled", "interrupted", "error")


class StoreError(Exception):
    """The database cannot be used; the message says why and what to do. Nothing was deleted."""


class NotFound(KeyError):
    pass


def new_id() -> str:
    return secrets.token_hex(6)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            raise StoreError(
                f"cannot open the conversation store {path}: {exc}. If another vramchatd uses this "
                "data directory, stop it or start this one with --data-dir elsewhere."
            ) from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"the conversation store {path} is damaged ({exc}). It was left untouched: move it "
                f"aside (mv {path} {path}.damaged) to start empty, or try `sqlite3 {path} .recover`."
            ) from None

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _write(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            with self._transaction():
                return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path} failed: {exc}") from None

    # --- conversations ---------------------------------------------------------------------

    def create_conversation(self, title: str, system_prompt: str = "", settings: dict[str, Any] | None = None) -> dict[str, Any]:
        now = time.time()
        conversation_id = new_id()
        self._write(
            "INSERT INTO conversations (id, title, system_prompt, settings, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, title, system_prompt, json.dumps(settings or {}), now, now),
        )
        return self.get_conversation(conversation_id)

    def list_conversations(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
            "FROM conversations c ORDER BY c.updated_at DESC"
        ).fetchall()
        return [_conversation(row) for row in rows]

    def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
            "FROM conversations c WHERE c.id = ?",
            (conversation_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return _conversation(row)

    def resolve_conversation(self, id_or_prefix: str) -> str:
        """Accept a unique id prefix, as git does, so people can type 4 characters."""
        if not id_or_prefix:
            raise NotFound("no conversation id given: name one, or a unique prefix of its id")
        rows = self._db.execute(
            "SELECT id FROM conversations WHERE id LIKE ? || '%' ESCAPE '\\' LIMIT 2",
            (id_or_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"),),
        ).fetchall()
        if len(rows) != 1:
            raise NotFound(f"no conversation {id_or_prefix!r}" if not rows else f"{id_or_prefix!r} matches several conversations")
        return rows[0]["id"]

    def update_conversation(
        self,
        conversation_id: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        current = self.get_conversation(conversation_id)
        self._write(
            "UPDATE conversations SET title = ?, system_prompt = ?, settings = ?, updated_at = ? WHERE id = ?",
            (
                current["title"] if title is None else title,
                current["system_prompt"] if system_prompt is None else system_prompt,
                json.dumps(current["settings"] if settings is None else settings),
                time.time(),
                conversation_id,
            ),
        )
        return self.get_conversation(conversation_id)

    def delete_conversation(self, conversation_id: str) -> None:
        if self._write("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
            raise NotFound(f"no conversation {conversation_id!r}")

    # --- messages --------------------------------------------------------------------------

    def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        self.get_conversation(conversation_id)
        rows = self._db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY position", (conversation_id,)
        ).fetchall()
        return [_message(row) for row in rows]

    def add_message(
        self, conversation_id: str, role: str, content: str, *, status: str = "complete", model: str | None = None
    ) -> dict[str, Any]:
        now = time.time()
        message_id = new_id()
        try:
            with self._transaction():
                (position,) = self._db.execute(
                    "SELECT coalesce(max(position), -1) + 1 FROM messages WHERE conversation_id = ?", (conversation_id,)
                ).fetchone()
                self._db.execute(
                    "INSERT INTO messages (id, conversation_id, position, role, content, status, model, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (message_id, conversation_id, position, role, content, status, model, now, now),
                )
                self._db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        except sqlite3.IntegrityError:
            raise NotFound(f"no conversation {conversation_id!r}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path} failed: {exc}") from None
        return self.get_message(message_id)

    def get_message(self, message_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFound(f"no message {message_id!r}")
        return _message(row)

    def update_message(
        self,
        message_id: str,
        *,
        content: str | None = None,
        status: str | None = None,
        stats: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        assignments = ["updated_at = ?"]
        params: list[Any] = [time.time()]
        for column, value in (("content", content), ("status", status), ("error", error)):
            if value is not None:
                assignments.append(f"{column} = ?")
                params.append(value)
        if stats is not None:
            assignments.append("stats = ?")
            params.append(json.dumps(stats))
        self._write(f"UPDATE messages SET {', '.join(assignments)} WHERE id = ?", (*params, message_id))

    def delete_message(self, message_id: str) -> None:
        self._write("DELETE FROM messages WHERE id = ?", (message_id,))

    def mark_interrupted(self) -> int:
        """Replies left `generating` by a daemon that died: keep their text, say they were cut."""
        cursor = self._write(
            "UPDATE messages SET status = 'interrupted', error = ?, updated_at = ? WHERE status = 'generating'",
            ("the daemon stopped while this reply was being generated", time.time()),
        )
        return cursor.rowcount


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _conversation(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    data["settings"] = json.loads(data["settings"] or "{}")
    return data


def _message(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    data["stats"] = json.loads(data["stats"]) if data["stats"] else None
    return data
