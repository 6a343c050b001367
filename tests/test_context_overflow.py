"""Conversations longer than the context window: the oldest turns leave the model's view, never the store."""

from __future__ import annotations

import statistics
import subprocess
import sys
from typing import Any

import pytest
from textual.widgets import Checkbox

from vramchat.shared.client import Client, RequestFailed
from vramchat.tui.app import VramchatApp
from vramchat.tui.dialogs import SettingsDialog
from vramchat.tui.widgets import ChatMessage

from helpers import DaemonFactory, DaemonProcess, collect_reply, wait_ready

TURNS = 30
REPLY_TOKENS = 60


async def hold_conversation(client: Client, turns: int, settings: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A conversation of `turns` questions; its id and every final reply message."""
    conversation = (await client.request("conversation.create", {"title": "long", "settings": settings}))["conversation"]["id"]
    await client.subscribe()
    events = client.raw_events()
    replies = []
    for turn in range(turns):
        request_id = f"turn-{turn}"
        body = {"content": f"Tell me one fact about the number {turn + 1}.", "conversation": conversation}
        await client.request("chat", body, request_id=request_id)
        _, final = await collect_reply(events, request_id)
        assert final is not None
        replies.append(final)
        if final["status"] != "complete":
            break
    return conversation, replies


@pytest.mark.demo
async def test_a_30_turn_conversation_at_n_ctx_512_keeps_going_and_keeps_every_message(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory("--ctx", "512")
    async with Client(daemon.runtime_dir, timeout=120) as client:
        model = await wait_ready(client, timeout=60)
        n_ctx = model["n_ctx"]
        assert n_ctx == 512
        conversation, replies = await hold_conversation(client, TURNS, {"max_tokens": REPLY_TOKENS, "temperature": 0.0})
        stored = (await client.request("conversation.get", {"id": conversation}))["messages"]
    assert [r["status"] for r in replies] == ["complete"] * TURNS, [r.get("error") for r in replies]
    assert len(stored) == 2 * TURNS and [m["role"] for m in stored] == ["user", "assistant"] * TURNS
    ids = [m["id"] for m in stored]

    views = [r["stats"]["context"] for r in replies]
    assert views[0] is None  # the first turns fit whole
    assert views[-1] is not None and views[-1]["dropped"] > 0, "30 turns of 60 tokens never outgrew 512 tokens?"
    for reply, view in zip(replies, views, strict=True):
        stats = reply["stats"]
        assert stats["prompt_tokens"] <= n_ctx - min(REPLY_TOKENS, n_ctx // 4)  # room for the whole reply
        if view is None:
            continue
        first = ids.index(view["first_message"])
        assert view["dropped"] == first and stored[first]["role"] == "user"  # the marker sits before a question
        assert first < ids.index(reply["id"]) - 1  # the question being answered is always in view
    starts = [v["dropped"] if v else 0 for v in views]
    assert starts == sorted(starts)  # the view only moves forward: each prompt extends the previous one

    # Dropping turns halves the window at once, so that the following turns extend the same
    # prompt and the KV cache is reused: most late turns evaluate only the new exchange.
    evaluated = [r["stats"]["prompt_tokens"] - r["stats"]["prompt_cached_tokens"] for r in replies]
    first_turns, last_turns = statistics.median(evaluated[:3]), statistics.median(evaluated[-10:])
    assert last_turns <= 2 * first_turns, evaluated

    # Where the view starts, as `vramchat conversations ID` and the TUI show it.
    dropped = views[-1]["dropped"]
    marker = f"--- {dropped} earlier messages are outside the context window"
    printed = subprocess.run(
        [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "conversations", conversation],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    before, _, after = printed.partition(marker)
    assert (
        after
        and before.count("\nuser:") == dropped // 2
        and after.split("\n\n")[1].startswith("user:\n" + stored[dropped]["content"])
    )
    app = VramchatApp(Client(daemon.runtime_dir, name="vramchat tui"))
    async with app.run_test(size=(80, 24)) as pilot:
        while not (app.connected and app.state.conversations):
            await pilot.pause(0.05)
        app.state.current = conversation
        await app.chat.show_conversation()
        shown = list(app.chat.message_log.children)
        markers = [i for i, widget in enumerate(shown) if widget.has_class("view-start")]
        assert len(markers) == 1 and markers[0] == dropped  # right above the first message in view
        assert isinstance(shown[dropped + 1], ChatMessage) and shown[dropped + 1].message["id"] == views[-1]["first_message"]
        assert f"{dropped} earlier messages are outside the context window" in str(shown[dropped].render())


@pytest.mark.demo
async def test_the_error_policy_keeps_the_old_refusal(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory("--ctx", "256")
    async with Client(daemon.runtime_dir, timeout=120) as client:
        await wait_ready(client, timeout=60)
        settings = {"max_tokens": REPLY_TOKENS, "temperature": 0.0, "context_overflow": "error"}
        conversation, replies = await hold_conversation(client, TURNS, settings)
        stored = (await client.request("conversation.get", {"id": conversation}))["messages"]
        with pytest.raises(RequestFailed, match="context_overflow must be one of drop_oldest, error"):
            await client.request("conversation.update", {"id": conversation, "settings": {"context_overflow": "rotate"}})
    failed = replies[-1]
    assert failed["status"] == "error" and "context window is 256" in failed["error"] and "drop_oldest" in failed["error"]
    assert all(r["status"] == "complete" for r in replies[:-1]) and len(replies) < TURNS
    assert len(stored) == 2 * len(replies)  # the failed turn's question and error are stored too


async def test_the_settings_dialog_sets_the_conversations_overflow_policy(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        conversation = (await client.request("conversation.create", {"title": "policy"}))["conversation"]
        app = VramchatApp(Client(tiny_daemon.runtime_dir, name="vramchat tui"))
        async with app.run_test(size=(80, 24)) as pilot:
            while not (app.connected and app.state.conversations):
                await pilot.pause(0.05)
            app.state.current = conversation["id"]
            await app.chat.show_conversation()
            await pilot.press("f5")
            assert isinstance(app.screen, SettingsDialog)
            dropping = app.screen.query_one("#drop-oldest", Checkbox)
            assert dropping.value  # the daemon's default
            await pilot.press("ctrl+s")  # unchanged: nothing is pinned
            while isinstance(app.screen, SettingsDialog):
                await pilot.pause(0.05)
            stored = (await client.request("conversation.get", {"id": conversation["id"]}))["conversation"]
            assert "context_overflow" not in stored["settings"]
            await pilot.press("f5")
            app.screen.query_one("#drop-oldest", Checkbox).value = False
            await pilot.press("ctrl+s")
            for _ in range(100):
                stored = (await client.request("conversation.get", {"id": conversation["id"]}))["conversation"]
                if stored["settings"].get("context_overflow"):
                    break
                await pilot.pause(0.05)
    assert stored["settings"]["context_overflow"] == "error"
