"""Edit, regenerate and versions in the TUI against a real daemon (the tiny model): an edit in one
app is answered with the KV cache reused, a second attached app follows it and switches back to
the version kept; a regenerated reply is a second version; nothing is deleted."""

from __future__ import annotations

import sqlite3
from typing import Any

from textual.widgets import Label
from tui_pilot import focused_id, palette, until

from vramchat.shared.client import Client
from vramchat.tui.app import VramchatApp
from vramchat.tui.message_actions import EDITING_TITLE
from vramchat.tui.widgets import ChatMessage, PromptInput

from helpers import DaemonProcess


def log(app: VramchatApp) -> list[tuple[str, str, str]]:
    """What the log shows: (role, status, content) per message."""
    return [(w.message["role"], w.message["status"], w.message["content"]) for w in app.query(ChatMessage)]


def shown_ids(app: VramchatApp) -> list[str]:
    return [w.message["id"] for w in app.query(ChatMessage)]


def answered(app: VramchatApp, *questions: str) -> bool:
    """The log shows these questions, each with a complete reply."""
    shown = log(app)
    questions_shown = [content for role, _, content in shown if role == "user"]
    return questions_shown == list(questions) and [s for r, s, _ in shown if r == "assistant"] == ["complete"] * len(questions)


async def ask(pilot: Any, app: VramchatApp, text: str) -> None:
    app.query_one(PromptInput).insert(text)
    await pilot.press("enter")


async def test_an_edit_is_answered_and_a_second_app_switches_back_to_the_kept_version(tiny_daemon: DaemonProcess) -> None:
    first = VramchatApp(Client(tiny_daemon.runtime_dir, name="vramchat tui"))
    second = VramchatApp(Client(tiny_daemon.runtime_dir, name="vramchat tui"))
    async with first.run_test(size=(80, 24)) as p1, second.run_test(size=(100, 30)) as p2:
        await until(p1, lambda: first.connected and second.connected and first.state.model.get("state") == "ready", 30)
        await ask(p1, first, "Where do walruses live?")
        await until(p1, lambda: answered(first, "Where do walruses live?"), 60)
        await ask(p1, first, "What do walruses eat?")
        await until(p1, lambda: answered(first, "Where do walruses live?", "What do walruses eat?"), 60)
        before, before_ids = log(first), shown_ids(first)
        second.state.current = first.state.current
        await second.chat.show_conversation()
        await until(p2, lambda: log(second) == before)

        await palette(p1, first, "Edit the last message")
        prompt = first.query_one(PromptInput)
        assert prompt.text == "What do walruses eat?" and prompt.border_title == EDITING_TITLE
        prompt.text = "What do penguins eat?"
        await p1.press("enter")
        await until(p1, lambda: answered(first, "Where do walruses live?", "What do penguins eat?"), 60)
        after, edited_reply = log(first), first.query(ChatMessage).last().message
        assert after[:2] == before[:2] and after[3] != before[3]
        await until(p2, lambda: log(second) == after)  # the second app follows the switch
        question = [w for w in second.query(ChatMessage) if w.message["role"] == "user"][-1]
        await until(p2, lambda: question.query(".versions"))
        assert str(question.query_one(".versions", Label).render()) == "\u2039 2/2 \u203a"

        question.focus()
        await p2.press("[")  # back to the version before the edit, in both apps
        await until(p2, lambda: shown_ids(second) == before_ids and focused_id(second) == before_ids[2])
        assert log(second) == before
        await until(p1, lambda: log(first) == before)

    # The edited question shares the first turn with the prompt before it: that part of the KV
    # cache was reused, and only the rest evaluated.
    stats = edited_reply["stats"]
    assert 0 < stats["prompt_cached_tokens"] < stats["prompt_tokens"], stats
    with sqlite3.connect(tiny_daemon.data_dir / "conversations.sqlite3") as db:
        stored = sorted(content for (content,) in db.execute("SELECT content FROM messages"))
    assert stored == sorted(c for _, _, c in before + after[2:])  # nothing deleted: both versions kept


async def test_r_on_a_reply_makes_a_second_version_and_left_brings_the_first_back(tiny_daemon: DaemonProcess) -> None:
    app = VramchatApp(Client(tiny_daemon.runtime_dir, name="vramchat tui"))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connected and app.state.model.get("state") == "ready", 30)
        await ask(pilot, app, "Where do walruses live?")
        await until(pilot, lambda: answered(app, "Where do walruses live?"), 60)
        first = app.query(ChatMessage).last()
        old_id = first.message["id"]
        first.focus()
        await pilot.press("r")
        # The old reply leaves the screen, the new one is answered and says it is the second version.
        await until(pilot, lambda: answered(app, "Where do walruses live?") and shown_ids(app)[1] != old_id, 60)
        reply = app.query(ChatMessage).last()
        await until(pilot, lambda: reply.query(".versions"))
        assert str(reply.query_one(".versions", Label).render()) == "\u2039 2/2 \u203a"
        reply.focus()
        await pilot.press("left")
        await until(pilot, lambda: shown_ids(app)[1] == old_id and focused_id(app) == old_id)
        assert answered(app, "Where do walruses live?")
