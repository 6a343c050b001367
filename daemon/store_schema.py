"""The conversation store's schema, and the migration of a database an older vramchatd wrote.

Version 2 keeps messages as a tree: each message names the one it follows (`parent_id`) and a
conversation names the last message of its current branch (`head`), so an edit or a regenerate
adds a sibling instead of deleting anything. `seq` is a stable integer key per message for the
full-text index (SQLite's implicit rowid may change on VACUUM). The index is kept in step by
triggers, so no writer can forget it.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2

TABLES = [
    """CREATE TABLE IF NOT EXISTS conversations (
        id            TEXT PRIMARY KEY,
        title         TEXT NOT NULL,
        system_prompt TEXT NOT NULL DEFAULT '',
        settings      TEXT NOT NULL DEFAULT '{}',
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        head          TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS messages (
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
        updated_at      REAL NOT NULL,
        parent_id       TEXT,
        seq             INTEGER
    )""",
]

# What version 2 adds on top of the tables; each statement is safe to run again.
INDEXES_AND_SEARCH = [
    "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, position)",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_by_seq ON messages (seq)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5("
    "content, content='messages', content_rowid='seq', tokenize='unicode61 remove_diacritics 2')",
    """CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END""",
    """CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.seq, old.content);
    END""",
    """CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF content ON messages
    WHEN old.content IS NOT new.content BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.seq, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END""",
]

# Version 1 to 2: a linear conversation is one branch: each message follows the one before it by
# position, and the head is the last. The full-text index is built from what is stored.
FROM_VERSION_1 = [
    "ALTER TABLE messages ADD COLUMN parent_id TEXT",
    "ALTER TABLE messages ADD COLUMN seq INTEGER",
    "ALTER TABLE conversations ADD COLUMN head TEXT",
    "UPDATE messages SET seq = rowid",
    """UPDATE messages SET parent_id = (
        SELECT before.id FROM messages AS before
        WHERE before.conversation_id = messages.conversation_id AND before.position < messages.position
        ORDER BY before.position DESC LIMIT 1
    )""",
    """UPDATE conversations SET head = (
        SELECT m.id FROM messages AS m WHERE m.conversation_id = conversations.id ORDER BY m.position DESC LIMIT 1
    )""",
    *INDEXES_AND_SEARCH,
    "INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')",
]


class NewerSchema(Exception):
    """The database was written by a newer vramchatd; this one must not touch it."""


def prepare(db: sqlite3.Connection) -> None:
    """Bring `db` to SCHEMA_VERSION in one transaction: create it, or migrate an older one.

    Statement by statement, not executescript(), which would commit the transaction half-way."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise NewerSchema(f"schema version {version}; this vramchatd knows up to {SCHEMA_VERSION}")
    db.execute("BEGIN IMMEDIATE")
    try:
        has_tables = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'").fetchone()
        statements = FROM_VERSION_1 if has_tables and version < 2 else [*TABLES, *INDEXES_AND_SEARCH]
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
