"""The palette entries and message keys of issue 24 (copy, edit, regenerate, versions, reasoning,
search, export), driven by Pilot against a stand-in client: what each one copies, requests or
writes. The same against a real daemon: test_tui_versions.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Collapsible, Label, OptionList
from tui_pilot import focused_id, palette, until
from tui_stub import StubClient

from vramchat.shared.markdown_export import conversation_markdown
from vramchat.tui.app import VramchatApp
from vramchat.tui.message_actions import EDITING_TITLE
from vramchat.tui.search_screen import SearchScreen
from vramchat.tui.state import ChatState
from vramchat.tui.widgets import ChatMessage, ConversationList, PromptInput


def message(id_: str, role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": id_,
        "conversation_id": extra.pop("conversation", "c1"),
        "role": role,
        "content": content,
        "status": "complete",
        "stats": None,
        "error": None,
        "model": "SmolLM2-135M-Instruct-Q4_1.gguf" if role == "assistant" else None,
        "created_at": 1_700_000_000.0,
        **extra,
    }


TWO_BLOCKS = "Use slicing:\n\n```python\nitems[::-1]\n```\n\nor in place:\n\n~~~python\nitems.reverse()\n~~~\n"
THINKING = "<think>A string is a sequence, so\n```python\nnot this\n```\n</think>\nSlice it too:\n\n```python\ntext[::-1]\n```"
VERSIONS_NEW = {"index": 2, "count": 2, "ids": ["m3a", "m3"]}
VERSIONS_OLD = {"index": 1, "count": 2, "ids": ["m3a", "m3"]}
CURRENT = [
    message("m1", "user", "How do I reverse a list in Python?"),
    message("m2", "assistant", TWO_BLOCKS),
    message("m3", "user", "And a string?", versions=VERSIONS_NEW),
    message("m4", "assistant", THINKING),
]
EARLIER = [
    *CURRENT[:2],
    message("m3a", "user", "And a tuple?", versions=VERSIONS_OLD),
    message("m4a", "assistant", "tuple(reversed(t))"),
]
CONVERSATIONS: list[dict[str, Any]] = [
    {"id": "c1", "title": "Reversing lists", "settings": {}, "system_prompt": None, "created_at": 1_700_000_000.0},
    {"id": "c2", "title": "Rust lifetimes", "settings": {}, "system_prompt": None, "created_at": 1_700_000_000.0},
]
SNAPSHOT: dict[str, Any] = {
    "epoch": "e",
    "seq": 1,
    "model": {"state": "ready", "name": "SmolLM2-135M-Instruct-Q4_1.gguf"},
    "clients": 1,
    "in_flight": None,
    "queue": {"running": None, "pending": []},
    "conversations": CONVERSATIONS,
    "telemetry": {"history": []},
    "alarms": [],
}
LIFETIME = message("x1", "assistant", "A lifetime names how long a borrow lives.", conversation="c2")
SEARCH_RESULTS = {
    "results": [
        {
            "conversation": "c2",
            "title": "Rust lifetimes",
            "message": "x1",
            "role": "assistant",
            "line": "A lifetime names how long a borrow lives.",
            "current": False,
            "created_at": 1_700_000_000.0,
        }
    ]
}


def stub_app(messages: dict[str, list[dict[str, Any]]] | None = None) -> tuple[VramchatApp, StubClient]:
    client = StubClient(SNAPSHOT, messages or {"c1": list(CURRENT), "c2": [LIFETIME]}, {"conversation.search": SEARCH_RESULTS})
    return VramchatApp(client), client


async def shown(pilot: Any, app: VramchatApp) -> list[str]:
    """Wait for the snapshot's chat on screen; the list gets the notifications from then on."""
    await until(pilot, lambda: len(app.query(ChatMessage)) == len(CURRENT))
    notes: list[str] = []
    original = app.notify

    def notify(message: str, **kwargs: Any) -> None:
        notes.append(message)
        original(message, **kwargs)

    app.notify = notify  # type: ignore[method-assign]
    return notes


async def test_palette_copies_the_last_reply_as_stored() -> None:
    app, _ = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        notes = await shown(pilot, app)
        await palette(pilot, app, "Copy the last reply")
        await until(pilot, lambda: app.clipboard)
        assert app.clipboard == THINKING  # reasoning and all, as stored
        assert notes[-1].startswith("copied the reply")


async def test_palette_copies_the_last_code_block_without_its_fences() -> None:
    app, _ = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        notes = await shown(pilot, app)
        await palette(pilot, app, "Copy the last code block")
        await until(pilot, lambda: app.clipboard)
        assert app.clipboard == "text[::-1]"  # the answer's block, not the one in its reasoning
        assert notes[-1] == "copied the last code block of 1 (1 line), without the fences"


async def test_copy_the_last_code_block_says_when_there_is_none() -> None:
    app, _ = stub_app({"c1": [*CURRENT[:3], message("m4", "assistant", "Use `s[::-1]`, no block here.")], "c2": []})
    async with app.run_test(size=(80, 24)) as pilot:
        notes = await shown(pilot, app)
        await palette(pilot, app, "Copy the last code block")
        await until(pilot, lambda: notes)
        assert notes[-1] == "no fenced code block in this message: nothing was copied" and app.clipboard == ""


async def test_keys_move_from_the_prompt_through_the_messages_and_back() -> None:
    app, _ = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, app)
        assert isinstance(app.focused, PromptInput)
        await pilot.press("ctrl+up")
        assert focused_id(app) == "m4"
        await pilot.press("k", "up")
        assert focused_id(app) == "m2"
        await pilot.press("j")
        assert focused_id(app) == "m3"
        await pilot.press("escape")
        assert isinstance(app.focused, PromptInput)
        await pilot.press("up")  # on an empty prompt, ↑ goes to the last message too
        assert focused_id(app) == "m4"
        await pilot.press("down")  # past the last message: the prompt
        assert isinstance(app.focused, PromptInput)


async def test_a_focused_message_copies_itself_and_cycles_its_code_blocks() -> None:
    app, _ = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        notes = await shown(pilot, app)
        app.chat.message_widget("m2").focus()  # type: ignore[union-attr]
        await pilot.press("c")
        assert app.clipboard == TWO_BLOCKS
        copied = []
        for _ in range(3):
            await pilot.press("y")
            copied.append(app.clipboard)
        assert copied == ["items.reverse()", "items[::-1]", "items.reverse()"]
        assert notes[-2] == "copied code block 1 of 2 (1 line), without the fences"


async def test_e_on_a_question_edits_it_and_enter_sends_an_edit() -> None:
    app, client = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, app)
        prompt = app.query_one(PromptInput)
        app.chat.message_widget("m1").focus()  # type: ignore[union-attr]
        await pilot.press("e")
        assert prompt.text == "How do I reverse a list in Python?" and prompt.border_title == EDITING_TITLE
        assert app.focused is prompt
        await pilot.press("backspace", *" in place?", "enter")
        await until(pilot, lambda: client.requests)
        edited = "How do I reverse a list in Python in place?"
        assert client.requests == [("edit", {"conversation": "c1", "message": "m1", "content": edited})]
        await until(pilot, lambda: prompt.text == "" and not prompt.border_title)
        assert app.editing is None


async def test_edit_the_last_message_from_the_palette_and_escape_keeps_the_draft() -> None:
    app, client = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, app)
        prompt = app.query_one(PromptInput)
        prompt.insert("half a thought")
        await palette(pilot, app, "Edit the last message")
        assert prompt.text == "And a string?" and prompt.border_title == EDITING_TITLE and prompt.has_class("editing")
        await pilot.press("escape")
        await until(pilot, lambda: app.editing is None)
        assert prompt.text == "half a thought" and not prompt.border_title
        assert client.requests == []  # nothing sent, nothing cancelled


async def test_e_on_a_reply_and_r_on_a_question_do_nothing_and_r_regenerates_a_reply() -> None:
    app, client = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, app)
        app.chat.message_widget("m2").focus()  # type: ignore[union-attr]
        await pilot.press("e")
        assert app.editing is None
        await pilot.press("r")
        await until(pilot, lambda: client.requests)
        assert client.requests == [("regenerate", {"conversation": "c1", "message": "m2"})]
        app.chat.message_widget("m1").focus()  # type: ignore[union-attr]
        await pilot.press("r")
        await pilot.pause()
        assert len(client.requests) == 1


async def test_brackets_switch_versions_and_the_switched_event_redraws_the_log() -> None:
    app, client = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, app)
        edited = app.chat.message_widget("m3")
        assert edited is not None
        await until(pilot, lambda: edited.query(".versions"))
        assert str(edited.query_one(".versions", Label).render()) == "\u2039 2/2 \u203a"
        assert not app.chat.message_widget("m1").query(".versions")  # type: ignore[union-attr]
        edited.focus()
        await pilot.press("]")  # already the newest
        await pilot.press("[")
        await until(pilot, lambda: client.requests)
        assert client.requests == [("conversation.switch", {"conversation": "c1", "message": "m3a"})]
        # What the daemon then does: the earlier version is current, and every app hears so.
        client.messages["c1"] = list(EARLIER)
        client.publish("conversation", {"action": "switched", "conversation": CONVERSATIONS[0]})
        await until(pilot, lambda: app.chat.message_widget("m4a") is not None and focused_id(app) == "m3a")
        assert [w.message["id"] for w in app.query(ChatMessage)] == ["m1", "m2", "m3a", "m4a"]
        await pilot.press("right")
        await until(pilot, lambda: len(client.requests) == 2)
        assert client.requests[-1] == ("conversation.switch", {"conversation": "c1", "message": "m3"})


def test_only_a_switch_of_the_conversation_on_screen_redraws_the_log() -> None:
    state = ChatState(conversations=list(CONVERSATIONS), current="c1")
    assert state.apply_event("conversation", {"action": "switched", "conversation": CONVERSATIONS[0]}).log
    assert not state.apply_event("conversation", {"action": "switched", "conversation": CONVERSATIONS[1]}).log
    assert not state.apply_event("conversation", {"action": "updated", "conversation": CONVERSATIONS[0]}).log


async def test_t_folds_and_unfolds_a_replys_reasoning() -> None:
    app, _ = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        notes = await shown(pilot, app)
        reply = app.chat.message_widget("m4")
        assert reply is not None
        if not reply.query(Collapsible).filter(".thinking"):  # until replies fold their reasoning themselves
            await reply.mount(Collapsible(Label("A string is a sequence"), title="thought", classes="thinking"))
        fold = reply.query(Collapsible).filter(".thinking").first()
        folded = fold.collapsed
        reply.focus()
        await pilot.press("t")
        assert fold.collapsed is not folded
        await pilot.press("t")
        assert fold.collapsed is folded
        app.chat.message_widget("m2").focus()  # type: ignore[union-attr]
        await pilot.press("t")
        assert notes[-1] == "this reply has no reasoning to fold"


@pytest.mark.parametrize("how", ["palette", "ctrl+f", "slash in the chat list"])
async def test_search_every_chat_opens_the_earlier_version_holding_the_match(how: str) -> None:
    app, client = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, app)
        if how == "palette":
            await palette(pilot, app, "Search every chat")
        elif how == "ctrl+f":
            await pilot.press("ctrl+f")
        else:
            await pilot.press("ctrl+l", "/")
        assert isinstance(app.screen, SearchScreen)
        await pilot.press(*"lifetime")
        results = app.screen.query_one(OptionList)
        await until(pilot, lambda: results.option_count == 1)
        assert "Rust lifetimes · assistant · earlier version" in str(results.get_option_at_index(0).prompt)
        assert client.requests[-1] == ("conversation.search", {"text": "lifetime", "limit": 50})
        await pilot.press("down", "enter")
        await until(pilot, lambda: client.requests[-1] == ("conversation.switch", {"conversation": "c2", "message": "x1"}))
        client.publish("conversation", {"action": "switched", "conversation": CONVERSATIONS[1]})  # as the daemon does
        await until(pilot, lambda: focused_id(app) == "x1")
        highlighted = app.query_one(ConversationList).highlighted_child
        assert app.state.current == "c2" and highlighted is not None and highlighted.name == "c2"


async def test_export_the_chat_as_markdown_writes_a_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Reversing-lists.md").write_text("mine")
    app, _ = stub_app()
    async with app.run_test(size=(80, 24)) as pilot:
        notes = await shown(pilot, app)
        await palette(pilot, app, "Export the chat as Markdown")
        await until(pilot, lambda: notes)
    written = tmp_path / "Reversing-lists-2.md"
    assert notes[-1] == f"exported to {written}"
    assert written.read_text() == conversation_markdown(CONVERSATIONS[0], CURRENT)
    assert (tmp_path / "Reversing-lists.md").read_text() == "mine"  # never overwritten


@pytest.mark.parametrize("current", [True, False], ids=["current version", "earlier version"])
async def test_a_search_result_in_the_chat_on_screen_takes_the_focus_from_the_focused_message(current: bool) -> None:
    """The chat on screen is drawn again while the focus moves to the result: the focus must end
    on the result, on screen, not on the message focused before, which the redraw removed (no
    key would then reach the app)."""
    app, client = stub_app()
    target = "m4" if current else "m3a"
    result = {**SEARCH_RESULTS["results"][0], "conversation": "c1", "message": target, "current": current}
    client.replies["conversation.search"] = {"results": [result]}

    async def switch(body: dict[str, Any]) -> None:  # the daemon publishes the switch, then replies
        client.messages["c1"] = list(EARLIER)
        client.publish("conversation", {"action": "switched", "conversation": CONVERSATIONS[0]})
        while not client.events.empty():
            await asyncio.sleep(0)

    client.before_reply["conversation.switch"] = switch
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, app)
        await pilot.press("ctrl+up", "up")
        assert focused_id(app) == "m3"
        await pilot.press("ctrl+f", *"slicing")
        results = app.screen.query_one(OptionList)
        await until(pilot, lambda: results.option_count == 1)
        await pilot.press("down", "enter")
        await until(pilot, lambda: focused_id(app) == target)
        await pilot.pause()
        assert app.focused is not None and app.focused.is_attached and focused_id(app) == target
        await pilot.press("escape")
        assert isinstance(app.focused, PromptInput)
