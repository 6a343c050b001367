"""The conversation store: SQLite in WAL mode, one transaction per write.

WAL with synchronous=NORMAL survives a kill -9 of the daemon at any point (only a power loss can
drop the last transactions). A reply that was generating when the daemon died is marked
`interrupted` at the next start, never silently dropped.

Messages form a tree (store_tree.py): an edit or a regenerate adds a version beside a message and
moves the conversation's head, and nothing is deleted but a whole conversation. Every message is
in a full-text index (store_search.py).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from vramchat.daemon import store_search, store_tree
from vramchat.daemon.store_schema import NewerSchema, prepare

# complete: a finished user message or reply. generating: a reply being written right now.
# cancelled, interrupted (engine or daemon died), error: a reply that ended early; its text stays.
MESSAGE_STATUSES = ("complete", "generating", "cancelled", "interrupted", "error")


class StoreError(Exception):
    """The database cannot be used; the message says why and what to do. Nothing was deleted."""


class NotFound(KeyError):
    pass


class AtHead:
    """The default parent of a new message: the conversation's head, read in the same transaction."""


AT_HEAD = AtHead()


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
            prepare(self._db)
        except NewerSchema as exc:
            raise StoreError(
                f"the conversation store {path} was written by a newer vramchat ({exc}); it was left untouched: "
                "upgrade vramchat, or start this one with --data-dir elsewhere."
            ) from None
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
        """The current branch, first message to head, each with its `versions`: what a client
        shows and what the next prompt is built from."""
        conversation = self.get_conversation(conversation_id)
        return store_tree.branch(self._all_messages(conversation_id), conversation["head"])

    def _all_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        """Every stored message of a conversation, every version, in the order stored."""
        rows = self._db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY position", (conversation_id,)
        ).fetchall()
        return [_message(row) for row in rows]

    def add_message(
        self,
        conversation_id: str,
        role: str,
        content: str,
        *,
        parent: str | AtHead | None = AT_HEAD,
        status: str = "complete",
        model: str | None = None,
    ) -> dict[str, Any]:
        """Store a message after `parent` (by default the head: the end of the current branch) and
        make it the head. A parent other than the head adds a version beside the head's branch."""
        now = time.time()
        message_id = new_id()
        try:
            with self._transaction():
                row = self._db.execute("SELECT head FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
                if row is None:
                    raise NotFound(f"no conversation {conversation_id!r}")
                parent_id = row["head"] if isinstance(parent, AtHead) else parent
                (position, seq) = self._db.execute(
                    "SELECT coalesce(max(position), -1) + 1, (SELECT coalesce(max(seq), 0) + 1 FROM messages) "
                    "FROM messages WHERE conversation_id = ?",
                    (conversation_id,),
                ).fetchone()
                self._db.execute(
                    "INSERT INTO messages (id, conversation_id, position, role, content, status, model, created_at, "
                    "updated_at, parent_id, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (message_id, conversation_id, position, role, content, status, model, now, now, parent_id, seq),
                )
                self._db.execute(
                    "UPDATE conversations SET head = ?, updated_at = ? WHERE id = ?", (message_id, now, conversation_id)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"writing to {self.path} failed: {exc}") from None
        return self.get_message(message_id)

    def set_head(self, conversation_id: str, message_id: str | None) -> dict[str, Any]:
        """Make the branch ending at `message_id` current (None: before the first message)."""
        if message_id is not None and self.get_message(message_id)["conversation_id"] != conversation_id:
            raise NotFound(f"no message {message_id!r} in conversation {conversation_id!r}")
        if self._write("UPDATE conversations SET head = ? WHERE id = ?", (message_id, conversation_id)).rowcount == 0:
            raise NotFound(f"no conversation {conversation_id!r}")
        return self.get_conversation(conversation_id)

    def switch(self, conversation_id: str, message_id: str) -> dict[str, Any]:
        """Make current the branch through `message_id`, down to the newest message below it."""
        if self.get_message(message_id)["conversation_id"] != conversation_id:
            raise NotFound(f"no message {message_id!r} in conversation {conversation_id!r}")
        return self.set_head(conversation_id, store_tree.newest_leaf(self._all_messages(conversation_id), message_id))

    def search(self, text: str, limit: int) -> list[dict[str, Any]]:
        """Messages of every conversation matching `text` (every version), newest first; each says
        whether it is on its conversation's current branch."""
        results = store_search.search(self._db, text, limit)
        branches: dict[str, set[str]] = {}
        for result in results:
            conversation_id = result["conversation"]
            if conversation_id not in branches:
                branches[conversation_id] = {m["id"] for m in self.messages(conversation_id)}
            result["current"] = result["message"] in branches[conversation_id]
        return results

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
    del data["seq"]  # the search index's key, not the message's business
    return data
