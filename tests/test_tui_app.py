"""The Textual app driven by Pilot against a real daemon serving the tiny model."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from vramchat.shared.client import Client
from vramchat.tui.app import ChatMessage, DashboardScreen, PromptInput, VramchatApp, memory_bar_text


async def until(pilot: Any, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await pilot.pause(0.05)


def replies(app: VramchatApp) -> list[dict[str, Any]]:
    return [w.message for w in app.query(ChatMessage) if w.message["role"] == "assistant"]


async def type_and_send(pilot: Any, app: VramchatApp, text: str) -> None:
    app.query_one(PromptInput).focus()
    app.query_one(PromptInput).insert(text)
    await pilot.press("enter")


async def test_send_a_message_and_see_the_streamed_reply(tiny_daemon: Any) -> None:
    app = VramchatApp(str(tiny_daemon.runtime_dir))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connected and app.model.get("state") == "ready")
        await type_and_send(pilot, app, "hello")
        await until(pilot, lambda: any(r["status"] == "complete" for r in replies(app)))
        assert app.query_one(PromptInput).text == ""
        async with Client(tiny_daemon.runtime_dir) as client:
            stored = await client.request("conversation.get", {"id": app.current})
        shown = replies(app)[-1]
        assert shown["content"] == stored["messages"][-1]["content"] and shown["content"]
        assert "tokens" in str(app.query(ChatMessage).last().meta.render())


async def test_cancel_with_escape(tiny_daemon: Any) -> None:
    app = VramchatApp(str(tiny_daemon.runtime_dir))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connected and app.model.get("state") == "ready")
        async with Client(tiny_daemon.runtime_dir) as client:
            await client.request("conversation.update", {"id": (await client.request("conversation.create", {}))["conversation"]["id"],
                                                         "settings": {"temperature": 0.0, "max_tokens": 3000}})
        await until(pilot, lambda: bool(app.conversations))
        app.current = app.conversations[0]["id"]
        await type_and_send(pilot, app, "go on for a long time")
        await until(pilot, lambda: any(r["status"] == "generating" for r in replies(app)))
        await pilot.press("escape")
        await until(pilot, lambda: any(r["status"] == "cancelled" for r in replies(app)))


async def test_two_apps_show_a_reply_one_requested_and_switching_conversations(tiny_daemon: Any) -> None:
    first, second = VramchatApp(str(tiny_daemon.runtime_dir)), VramchatApp(str(tiny_daemon.runtime_dir))
    async with first.run_test(size=(80, 24)) as p1, second.run_test(size=(120, 40)) as p2:
        await until(p1, lambda: first.connected and second.connected and first.model.get("state") == "ready")
        await type_and_send(p1, first, "hello from the first app")
        await until(p1, lambda: any(r["status"] == "complete" for r in replies(first)))
        await until(p2, lambda: len(second.query("#conversations ListItem")) >= 1)
        await second.action_new_conversation()  # look at nothing first, then pick the chat from the list
        listing = second.query_one("#conversations")
        listing.focus()
        listing.index = 0
        await p2.press("enter")
        await until(p2, lambda: second.current == first.current and any(r["status"] == "complete" for r in replies(second)))
        assert replies(second)[-1]["content"] == replies(first)[-1]["content"]
        assert "2 client(s)" in first.sub_title or "3 client(s)" in first.sub_title


async def test_dashboard_and_memory_bar(tiny_daemon: Any) -> None:
    app = VramchatApp(str(tiny_daemon.runtime_dir))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: len(app.history) >= 2)
        bar = memory_bar_text(app.history[-1], app.model)
        assert "no NVIDIA GPU" in bar and "RAM" in bar and "tiny.gguf" in bar
        await pilot.press("f2")
        assert isinstance(app.screen, DashboardScreen)
        await pilot.pause(0.6)
        assert "no NVIDIA GPU" in str(app.screen.query_one("#dashboard-status").render())
        await pilot.press("escape")
        assert not isinstance(app.screen, DashboardScreen)


async def test_the_app_reconnects_after_a_daemon_restart_and_keeps_the_input(tiny_daemon: Any) -> None:
    app = VramchatApp(str(tiny_daemon.runtime_dir))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connected)
        app.query_one(PromptInput).insert("half-typed")
        tiny_daemon.stop()
        await until(pilot, lambda: not app.connected, timeout=10)
        tiny_daemon.start()
        await until(pilot, lambda: app.connected and app.model.get("state") == "ready", timeout=30)
        assert app.query_one(PromptInput).text == "half-typed"
