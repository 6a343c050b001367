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
