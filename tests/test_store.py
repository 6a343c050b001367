"""The SQLite conversation store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vramchat.daemon.store import NotFound, Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "c.sqlite3")


def test_uses_wal_mode(store: Store) -> None:
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_conversation_lifecycle(store: Store) -> None:
    created = store.create_conversation("first", system_prompt="be brief", settings={"temperature": 0.2})
    store.add_message(created["id"], "user", "hi")
    reply = store.add_message(created["id"], "assistant", "", status="generating")
    store.update_message(reply["id"], content="hello", status="complete", stats={"generated_tokens": 1})
    renamed = store.update_conversation(created["id"], title="renamed")
    assert renamed["title"] == "renamed" and renamed["system_prompt"] == "be brief"
    assert renamed["settings"] == {"temperature": 0.2} and renamed["message_count"] == 2
    messages = store.messages(created["id"])
    assert [(m["role"], m["content"], m["status"], m["position"]) for m in messages] == [
        ("user", "hi", "complete", 0),
        ("assistant", "hello", "complete", 1),
    ]
    assert messages[1]["stats"] == {"generated_tokens": 1}
    store.delete_conversation(created["id"])
    assert store.list_conversations() == []
    assert store._db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    with pytest.raises(NotFound):
        store.get_conversation(created["id"])


def test_list_is_most_recent_first(store: Store) -> None:
    older = store.create_conversation("older")
    newer = store.create_conversation("newer")
    store.add_message(older["id"], "user", "bump")
    assert [c["title"] for c in store.list_conversations()] == ["older", "newer"]
    assert newer["id"] in {c["id"] for c in store.list_conversations()}


def test_resolve_accepts_a_unique_prefix_only(store: Store) -> None:
    one = store.create_conversation("one")
    assert store.resolve_conversation(one["id"][:5]) == one["id"]
    with pytest.raises(NotFound):
        store.resolve_conversation("zz")
    with pytest.raises(NotFound):
        store.resolve_conversation("%")  # LIKE wildcards are escaped, not matched


def test_a_message_for_a_missing_conversation_is_refused(store: Store) -> None:
    with pytest.raises(NotFound):
        store.add_message("nope", "user", "hi")


def test_generating_replies_become_interrupted_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    first = Store(path)
    conversation = first.create_conversation("c")
    reply = first.add_message(conversation["id"], "assistant", "", status="generating")
    first.update_message(reply["id"], content="partial text")
    first._db.close()  # no clean shutdown, as after kill -9
    second = Store(path)
    assert second.mark_interrupted() == 1
    stored = second.get_message(reply["id"])
    assert stored["status"] == "interrupted" and stored["content"] == "partial text" and stored["error"]


def test_a_damaged_database_gives_a_clear_error_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    store = Store(path)
    store.create_conversation("keep me")
    store.close()  # checkpoints the WAL into the main file
    data = bytearray(path.read_bytes())
    data[:16] = b"this is garbage!"
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(StoreError) as error:
        Store(path)
    assert "damaged" in str(error.value) and "mv" in str(error.value)
    assert path.read_bytes() == before


def test_a_locked_database_gives_a_clear_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite3")
    conversation = store.create_conversation("c")
    blocker = sqlite3.connect(tmp_path / "c.sqlite3", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    store._db.execute("PRAGMA busy_timeout=100")
    with pytest.raises(StoreError) as error:
        store.add_message(conversation["id"], "user", "hi")
    assert "locked" in str(error.value)
    blocker.execute("ROLLBACK")
    store.add_message(conversation["id"], "user", "hi")
    assert len(store.messages(conversation["id"])) == 1


# The schema a version-1 vramchatd wrote (before messages formed a tree), verbatim.
SCHEMA_VERSION_1 = """
CREATE TABLE conversations (
    id            TEXT PRIMARY KEY,
    title         TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    settings      TEXT NOT NULL DEFAULT '{}',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE messages (
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
CREATE INDEX messages_by_conversation ON messages (conversation_id, position);
PRAGMA user_version=1;
"""


def test_a_version_1_database_migrates_with_its_messages_and_their_order(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_VERSION_1)
    turns = [("user", "Where is Paris?"), ("assistant", "In France."), ("user", "And Rome?"), ("assistant", "Italy.")]
    # Stored out of id order, positions with a gap (a reply once deleted): order is by position.
    for conversation, title in (("c1", "first"), ("c2", "second")):
        old.execute("INSERT INTO conversations VALUES (?, ?, '', '{}', 1.0, 2.0)", (conversation, title))
        for position, (role, content) in reversed(list(enumerate(turns))):
            old.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, 'complete', NULL, NULL, NULL, ?, ?)",
                (f"{conversation}-{9 - position}", conversation, position * 2, role, content, 1.0 + position, 1.0 + position),
            )
    old.execute("INSERT INTO conversations VALUES ('c3', 'empty', '', '{}', 1.0, 2.0)")
    old.commit()
    old.close()

    store = Store(path)
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == 2
    for conversation in ("c1", "c2"):
        messages = store.messages(conversation)
        assert [(m["role"], m["content"]) for m in messages] == turns
        assert [m["parent_id"] for m in messages] == [None, *(m["id"] for m in messages[:-1])]
        assert all(m["versions"] == {"index": 1, "count": 1, "ids": [m["id"]]} for m in messages)
        assert store.get_conversation(conversation)["head"] == messages[-1]["id"]
    assert store.messages("c3") == [] and store.get_conversation("c3")["head"] is None
    # The migrated messages are searchable, and new ones follow the head.
    assert {r["message"] for r in store.search("pari", 10)} == {"c1-9", "c2-9"}
    added = store.add_message("c1", "user", "And Berlin?")
    assert added["parent_id"] == "c1-6" and store.messages("c1")[-1]["id"] == added["id"]
    store.close()
    assert Store(path).messages("c2") == messages  # opening a version-2 database again changes nothing


def test_a_database_from_a_newer_vramchat_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Store(path).close()
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version=3")
    newer.close()
    with pytest.raises(StoreError, match="newer vramchat"):
        Store(path)


def test_a_sibling_is_a_version_and_switching_brings_back_the_whole_branch(store: Store) -> None:
    conversation = store.create_conversation("c")["id"]
    q1 = store.add_message(conversation, "user", "q1")
    a1 = store.add_message(conversation, "assistant", "a1")
    q2 = store.add_message(conversation, "user", "q2")
    a2 = store.add_message(conversation, "assistant", "a2")
    edited = store.add_message(conversation, "user", "q1 edited", parent=None)
    reply = store.add_message(conversation, "assistant", "a1'")
    branch = store.messages(conversation)
    assert [m["content"] for m in branch] == ["q1 edited", "a1'"]
    assert branch[0]["versions"] == {"index": 2, "count": 2, "ids": [q1["id"], edited["id"]]}
    assert branch[1]["versions"] == {"index": 1, "count": 1, "ids": [reply["id"]]}

    store.switch(conversation, q1["id"])
    assert [m["id"] for m in store.messages(conversation)] == [q1["id"], a1["id"], q2["id"], a2["id"]]
    assert store.messages(conversation)[0]["versions"]["index"] == 1
    store.switch(conversation, a1["id"])  # from a message in the middle: down to the newest leaf below
    assert store.get_conversation(conversation)["head"] == a2["id"]
    store.switch(conversation, edited["id"])
    assert store.get_conversation(conversation)["head"] == reply["id"]
    assert store._db.execute("SELECT count(*) FROM messages").fetchone()[0] == 6
    other = store.create_conversation("other")["id"]
    with pytest.raises(NotFound):
        store.switch(other, q1["id"])
    with pytest.raises(NotFound):
        store.switch(conversation, "nope")


def test_the_search_index_follows_inserts_updates_and_deletes(store: Store) -> None:
    conversation = store.create_conversation("c")["id"]
    reply = store.add_message(conversation, "assistant", "", status="generating")
    assert store.search("zanzibar", 10) == []
    store.update_message(reply["id"], content="first line\nthe ferry to Zanzibar leaves at noon")
    [found] = store.search("zanz", 10)
    assert found["line"] == "the ferry to Zanzibar leaves at noon" and found["current"] is True
    store.update_message(reply["id"], content="now about Mombasa")
    assert store.search("zanzibar", 10) == [] and len(store.search("mombasa", 10)) == 1
    store.delete_conversation(conversation)  # the messages go by cascade: so do their index entries
    assert store.search("mombasa", 10) == []
    store._db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")  # raises if out of step
