"""The Textual app driven by Pilot, against a real daemon serving the tiny model or a stand-in client."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Input, Label, ListView, Markdown, Sparkline, TextArea
from textual.widgets.markdown import MarkdownBlock
from tui_stub import StubClient

from vramchat.shared.client import Client, Snapshot
from vramchat.shared.protocol import Event
from vramchat.tui.app import VramchatApp
from vramchat.tui.chat import ChatView
from vramchat.tui.dashboard import DashboardScreen, gauge
from vramchat.tui.dialogs import ConfirmDialog, SettingsDialog, TextDialog
from vramchat.tui.models_screen import LayerStepper, LoadDialog, ModelsScreen
from vramchat.tui.state import ChatState
from vramchat.tui.telemetry_view import NO_GPU
from vramchat.tui.widgets import ChatMessage, ConversationList, MemoryBar, PromptInput, layer_split

from helpers import UNBOUNDED


def attach(daemon: Any) -> VramchatApp:
    """The app, following the test daemon."""
    return VramchatApp(Client(daemon.runtime_dir, name="vramchat tui"))


async def until(pilot: Any, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await pilot.pause(0.05)


def replies(app: VramchatApp) -> list[dict[str, Any]]:
    return [w.message for w in app.query(ChatMessage) if w.message["role"] == "assistant"]


def text_of(widget: Any) -> str:
    return str(widget.render())


async def ready(pilot: Any, app: VramchatApp) -> None:
    await until(pilot, lambda: app.connected and app.state.model.get("state") == "ready")


async def on_conversation(pilot: Any, app: VramchatApp, conversation: str) -> None:
    """Wait for the daemon, then show `conversation`."""
    await ready(pilot, app)
    app.state.current = conversation
    await app.chat.show_conversation()


async def type_and_send(pilot: Any, app: VramchatApp, text: str) -> None:
    app.query_one(PromptInput).focus()
    app.query_one(PromptInput).insert(text)
    await pilot.press("enter")


def submit_while_streaming(app: VramchatApp, text: str) -> None:
    """What Enter does, without Pilot's press: that waits for an idle CPU, up to 2 s per key,
    and a reply of the tiny model can be over by then."""
    prompt = app.query_one(PromptInput)
    prompt.insert(text)
    prompt.post_message(PromptInput.Submitted(prompt.text))


async def long_conversation(runtime_dir: Path, max_tokens: int = 3000) -> str:
    """A conversation whose replies run long (3000 tokens), or until the test stops them
    (UNBOUNDED's max_tokens on big_context_daemon: generating still, whatever the speed)."""
    async with Client(runtime_dir) as client:
        conversation = (await client.request("conversation.create", {}))["conversation"]["id"]
        settings = {"temperature": 0.0, "max_tokens": max_tokens}
        await client.request("conversation.update", {"id": conversation, "settings": settings})
    return conversation


async def test_send_a_message_and_see_the_streamed_reply(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await type_and_send(pilot, app, "hello")
        await until(pilot, lambda: any(r["status"] == "complete" for r in replies(app)))
        assert app.query_one(PromptInput).text == ""
        async with Client(tiny_daemon.runtime_dir) as client:
            stored = await client.request("conversation.get", {"id": app.state.current})
        shown = replies(app)[-1]
        assert shown["content"] == stored["messages"][-1]["content"] and shown["content"]
        assert app.query(ChatMessage).last().body.source.strip() == shown["content"].strip()  # streamed, then completed
        assert "tokens" in text_of(app.query(ChatMessage).last().meta) and "tok/s" in text_of(app.query(ChatMessage).last().meta)
        assert [c["id"] for c in app.state.conversations] == [app.state.current]


async def test_a_chat_started_in_the_app_is_listed_under_its_first_message(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await type_and_send(pilot, app, "Why is the sky blue?\nAnswer in one line.")
        listed = app.query_one(ConversationList)
        await until(pilot, lambda: [text_of(label) for label in listed.query(Label)] == ["Why is the sky blue?"])
        await until(pilot, lambda: any(r["status"] == "complete" for r in replies(app)))
    async with Client(tiny_daemon.runtime_dir) as client:
        stored = (await client.request("conversation.list"))["conversations"]
    assert [c["title"] for c in stored] == ["Why is the sky blue?"]


async def test_ctrl_j_adds_a_newline_instead_of_sending(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await type_and_send(pilot, app, "")
        await pilot.press("a", "ctrl+j", "b")
        assert app.query_one(PromptInput).text == "a\nb" and not app.query(ChatMessage)


async def test_cancel_with_escape(big_context_daemon: Any) -> None:
    # UNBOUNDED: the reply still generates when Esc lands, at any speed.
    conversation = await long_conversation(big_context_daemon.runtime_dir, UNBOUNDED["max_tokens"])
    app = attach(big_context_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await on_conversation(pilot, app, conversation)
        submit_while_streaming(app, "go on for a long time")
        # Streamed: text is in the log while the reply is still generating.
        await until(
            pilot, lambda: any(r["status"] == "generating" for r in replies(app)) and app.query(ChatMessage).last().shown != ""
        )
        await pilot.press("escape")
        await until(pilot, lambda: any(r["status"] == "cancelled" for r in replies(app)))
        assert "cancelled" in text_of(app.query(ChatMessage).last().meta)


async def test_queue_position_while_another_clients_reply_generates(big_context_daemon: Any) -> None:
    app = attach(big_context_daemon)
    async with app.run_test(size=(80, 24)) as pilot, Client(big_context_daemon.runtime_dir) as other:
        await ready(pilot, app)
        await app.action_new_conversation()
        # Four UNBOUNDED replies of another client: they generate until the test cancels them, so
        # ours queues behind them at any speed.
        others = [f"other-{i}" for i in range(4)]
        for request in others:
            conversation = await long_conversation(big_context_daemon.runtime_dir, UNBOUNDED["max_tokens"])
            await other.request("chat", {"conversation": conversation, "content": "go on for a long time"}, request_id=request)
        queue = app.query_one("#queue", Label)
        await until(pilot, lambda: text_of(queue) == "another client's reply is generating" and queue.display)
        submit_while_streaming(app, "me too")
        queued = r"queued: [1-4] request\(s\) ahead of yours, another client's"
        await until(pilot, lambda: re.match(queued, text_of(queue)) is not None)
        await app.run_action("cancel")  # ours, queued; not the other client's running one
        await until(pilot, lambda: text_of(queue) == "another client's reply is generating")
        for request in reversed(others):  # none has finished: they are UNBOUNDED
            await other.request("cancel", {"request": request})
        await until(pilot, lambda: not queue.display)
        assert not replies(app)


@pytest.mark.demo
async def test_a_reply_streams_live_in_a_second_app_on_the_same_conversation(demo_daemon: Any) -> None:
    """On the demo model: the tiny one can finish 3,000 tokens in about a second, within the few
    frames an app paints while its CPU share paces them (tui/chat.py)."""
    conversation = await long_conversation(demo_daemon.runtime_dir)
    first, second = attach(demo_daemon), attach(demo_daemon)
    async with first.run_test(size=(80, 24)) as p1, second.run_test(size=(120, 40)) as p2:
        await until(p1, lambda: first.connected and second.connected and first.state.model.get("state") == "ready")
        for app in (first, second):
            app.state.current = conversation
            await app.chat.show_conversation()
        submit_while_streaming(first, "Write a long story about a lighthouse keeper and a storm.")
        seen: list[int] = []  # the second app's streamed length while the reply generates

        def growing() -> bool:
            reply = [w for w in second.query(ChatMessage) if w.message["role"] == "assistant"]
            if reply and reply[-1].message["status"] == "generating" and reply[-1].shown:
                seen.append(len(reply[-1].shown))
            return len(set(seen)) >= 3

        await until(p2, growing)
        await first.run_action("cancel")  # the reply generating on screen, in both apps
        await until(p2, lambda: any(r["status"] == "cancelled" for r in replies(second)))


async def test_two_apps_show_a_reply_one_requested_and_switching_conversations(tiny_daemon: Any) -> None:
    first, second = attach(tiny_daemon), attach(tiny_daemon)
    async with first.run_test(size=(80, 24)) as p1, second.run_test(size=(120, 40)) as p2:
        await until(p1, lambda: first.connected and second.connected and first.state.model.get("state") == "ready")
        await type_and_send(p1, first, "hello from the first app")
        await until(p1, lambda: any(r["status"] == "complete" for r in replies(first)))
        await until(p2, lambda: len(second.query("#conversations ListItem")) >= 1)
        await second.action_new_conversation()  # look at nothing first, then pick the chat from the list
        await p2.press("ctrl+l")
        assert isinstance(second.focused, ListView)
        second.query_one("#conversations", ListView).index = 0
        await p2.press("enter")
        await until(
            p2, lambda: second.state.current == first.state.current and any(r["status"] == "complete" for r in replies(second))
        )
        assert replies(second)[-1]["content"] == replies(first)[-1]["content"]
        assert isinstance(second.focused, PromptInput)
        await until(p1, lambda: "2 client(s)" in first.sub_title)


async def test_rename_settings_and_delete_a_conversation(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await type_and_send(pilot, app, "hello")
        await until(pilot, lambda: any(r["status"] == "complete" for r in replies(app)))
        await pilot.press("f4")
        assert isinstance(app.screen, TextDialog)
        app.screen.query_one("Input", Input).value = ""
        await pilot.press(*"Renamed", "enter")
        await until(pilot, lambda: "Renamed" in [text_of(label) for label in app.query("#conversations Label")])

        await pilot.press("f5")
        assert isinstance(app.screen, SettingsDialog)
        app.screen.query_one("#s-temperature").focus()
        await pilot.press(*"0.3")
        app.screen.query_one("#system-prompt", TextArea).insert("Answer briefly.")
        await pilot.press("ctrl+s")
        async with Client(tiny_daemon.runtime_dir) as client:
            await until(pilot, lambda: app.state.conversations[0]["settings"].get("temperature") == 0.3)
            stored = (await client.request("conversation.get", {"id": app.state.current}))["conversation"]
        assert stored["system_prompt"] == "Answer briefly." and stored["settings"] == {"temperature": 0.3}

        await pilot.press("f6")
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("y")
        await until(pilot, lambda: app.state.conversations == [] and app.state.current is None and not app.query(ChatMessage))


async def test_dashboard_and_memory_bar(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: len(app.state.history) >= 2 and app.state.model.get("state") == "ready")
        # The bar is drawn after the chat log, which the snapshot's redraw awaits first.
        await until(pilot, lambda: "tiny.gguf (ready" in text_of(app.query_one(MemoryBar)))
        assert "RAM" in text_of(app.query_one(MemoryBar))
        await pilot.press("f2")
        assert isinstance(app.screen, DashboardScreen)
        samples = len(app.state.history)
        await until(pilot, lambda: len(app.state.history) > samples + 1)
        assert "GPU: no NVIDIA GPU" in text_of(app.screen.query_one(".gpu-name"))
        ram_gauge = text_of(app.screen.query_one("#gauge-ram"))
        assert ram_gauge.startswith("RAM") and re.search("[▏▎▍▌▋▊▉█]", ram_gauge), ram_gauge
        # The dashboard redraws on a message posted after each sample: it follows the history.
        spark = app.screen.query_one("#spark-ram", Sparkline)
        await until(pilot, lambda: len(spark.data or []) == len(app.state.history))
        assert "predicted" in text_of(app.screen.query_one("#split"))
        assert "tiny.gguf" in text_of(app.screen.query_one(MemoryBar))
        await pilot.press("escape")
        assert not isinstance(app.screen, DashboardScreen)


async def test_models_screen_prediction_follows_the_layer_count_and_a_load_shows_progress(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("f3")
        assert isinstance(app.screen, ModelsScreen)
        table = app.screen.query_one(DataTable)
        await until(pilot, lambda: table.row_count >= 2)
        names = [str(table.get_row_at(i)[0]).removeprefix("● ") for i in range(table.row_count)]
        rows = dict(zip(names, (table.get_row_at(i) for i in range(table.row_count)), strict=True))
        columns = [str(column.key.value) for column in table.ordered_columns]
        gqa = dict(zip(columns, rows["tiny-gqa.gguf"], strict=True))
        assert gqa["quant"] == "F16" and gqa["layers"] == "4" and gqa["fits"] == "CPU only"
        assert "arch" not in columns  # at 80 columns, beside the demo model's 31-character name
        assert rows["tiny.gguf"][0] == "● tiny.gguf"  # the loaded one
        table.move_cursor(row=names.index("tiny-gqa.gguf"))
        await pilot.press("enter")
        dialog = app.screen
        assert isinstance(dialog, LoadDialog)
        prediction = dialog.query_one("#prediction")
        await until(pilot, lambda: "GPU layers" in text_of(prediction))
        assert text_of(prediction).startswith("0 GPU layers")  # auto, with no GPU here
        assert NO_GPU in text_of(prediction) and "VRAM" not in text_of(prediction)  # no VRAM against a 0 B budget
        assert not dialog.query_one("#budget-field").display
        before = text_of(prediction)
        await pilot.press("right", "right")
        assert dialog.query_one(LayerStepper).value == 2
        assert text_of(prediction).startswith("2 GPU layers: 1 of 4 layers + output") and text_of(prediction) != before
        await pilot.press("left")
        assert text_of(prediction).startswith("1 GPU layers: 0 of 4 layers + output")

        await pilot.press("enter")
        await until(
            pilot, lambda: app.state.model.get("name") == "tiny-gqa.gguf" and app.state.model.get("state") == "ready", timeout=30
        )
        await until(pilot, lambda: not isinstance(app.screen, (LoadDialog, ModelsScreen)))
        assert dialog.progress_seen and dialog.progress_seen[0] == 0.0  # the bar got the daemon's progress
        assert app.state.model["n_gpu_layers"] == 1
        await until(pilot, lambda: f"tiny-gqa.gguf (ready, {layer_split(app.state.model)})" in text_of(app.query_one(MemoryBar)))


GPU = {
    "index": 0,
    "name": "NVIDIA GeForce RTX 3060",
    "memory_total": 12 << 30,
    "memory_used": 1 << 30,
    "memory_free": 11 << 30,
    "utilization": 0,
    "temperature": 40,
    "power_w": 20.0,
    "engine_memory": 0,
    "other_memory": 1 << 30,
}


class ClientOnAGpuMachine(Client):
    """A real client whose daemon's telemetry claims a 12 GiB GPU: the GPU-layer keys offer a
    reload only where there is a GPU, and the engine here ignores the layer count anyway."""

    async def stream(self) -> AsyncIterator[Snapshot | Event]:
        async for item in super().stream():
            if isinstance(item, Snapshot):
                samples = (item.body.get("telemetry") or {}).get("history") or []
            else:
                samples = [item.body] if item.topic == "telemetry" else []
            for sample in samples:
                sample["gpus"] = [GPU]
            yield item


async def test_gpu_layer_keys_preview_and_ask_before_reloading(tiny_daemon: Any) -> None:
    app = VramchatApp(ClientOnAGpuMachine(tiny_daemon.runtime_dir, name="vramchat tui"))
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        notes: list[str] = []
        app.notify = lambda message, **_: notes.append(message)  # type: ignore[method-assign]
        await pilot.press("f7")  # the tiny model starts with 0 GPU layers: nothing to step down to
        assert not isinstance(app.screen, LoadDialog) and "already the least" in notes[-1]
        await pilot.press("f8")
        dialog = app.screen
        assert isinstance(dialog, LoadDialog) and "with 1 GPU layers (now 0)" in dialog.heading
        await until(pilot, lambda: text_of(dialog.query_one("#prediction")).startswith("1 GPU layers"))
        await pilot.press("escape")  # nothing reloads without a yes
        assert not isinstance(app.screen, LoadDialog) and app.state.model["n_gpu_layers"] == 0
        await pilot.press("f8")
        assert isinstance(app.screen, LoadDialog) and app.screen.query_one(LayerStepper).value == 1
        loaded_at = app.state.model.get("engine_pid")
        await pilot.press("enter")
        await until(
            pilot, lambda: app.state.model.get("state") == "ready" and app.state.model.get("engine_pid") != loaded_at, timeout=30
        )
        assert app.state.model["n_gpu_layers"] == 1


async def test_without_a_gpu_the_layer_keys_say_so_once_instead_of_offering_a_reload(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)  # this machine has no GPU, so neither does the daemon's telemetry
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        sample = app.state.latest_sample()
        assert sample is not None and sample["gpus"] == []
        notes: list[str] = []
        app.notify = lambda message, **_: notes.append(message)  # type: ignore[method-assign]
        await pilot.press("f8", "f8", "f7")
        assert notes == [NO_GPU] and not isinstance(app.screen, LoadDialog)
        assert "no effect" in NO_GPU and "CUDA" in NO_GPU and "RPC" in NO_GPU


async def test_a_load_error_is_shown_in_the_dialog(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("f3")
        table = app.screen.query_one(DataTable)
        await until(pilot, lambda: table.row_count >= 2)
        await pilot.press("enter")
        dialog = app.screen
        assert isinstance(dialog, LoadDialog)
        dialog.query_one("#n-ctx", Input).value = "5"
        await pilot.press("enter")
        error = dialog.query_one("#load-error")
        await until(pilot, lambda: error.display and "n_ctx must be between 16" in text_of(error))
        assert app.screen is dialog


async def test_the_app_reconnects_after_a_daemon_restart_and_keeps_the_input(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connected)
        app.query_one(PromptInput).insert("half-typed")
        tiny_daemon.stop()
        await until(pilot, lambda: not app.connected and app.sub_title.startswith("disconnected"), timeout=10)
        await pilot.press("enter")  # refused while disconnected: the text stays
        assert app.query_one(PromptInput).text == "half-typed"
        tiny_daemon.start()
        await until(pilot, lambda: app.connected and app.state.model.get("state") == "ready", timeout=30)
        assert app.query_one(PromptInput).text == "half-typed" and app.sub_title.startswith("connected")
        await pilot.press("enter")
        await until(pilot, lambda: any(r["status"] == "complete" for r in replies(app)))


def test_gauge_fills_in_eighths_so_a_small_fraction_still_shows() -> None:
    assert gauge("RAM", 0, 100, "x") == f"{'RAM':<11} {'░' * 20} x"
    assert gauge("RAM", 1, 1000, "x").split()[1].startswith("▏")  # 0.16 of a cell: shown, not rounded away
    assert gauge("RAM", 50, 100, "x").split()[1] == "█" * 10 + "░" * 10
    assert gauge("RAM", 33, 100, "x").split()[1] == "█" * 6 + "▋" + "░" * 13  # 52.8 eighths
    assert gauge("RAM", None, 100, "N/A").endswith("░ N/A")


async def test_a_finished_reply_shows_the_stored_text_whether_or_not_the_stream_matched_it() -> None:
    streamed = {"id": "m", "role": "assistant", "status": "generating", "content": "", "conversation_id": "c"}

    class OneMessage(App[None]):
        def compose(self) -> ComposeResult:
            yield ChatMessage(streamed)

    async with OneMessage().run_test() as pilot:
        widget = pilot.app.query_one(ChatMessage)
        await widget.append("The answer")
        await widget.finish({**streamed, "status": "complete", "content": "The answer is 42."})  # the stream fell behind
        assert widget.body.source.strip() == widget.shown == "The answer is 42."
        await widget.finish({**streamed, "status": "complete", "content": "Something else"})  # the stream was wrong
        assert widget.body.source == widget.shown == "Something else"


async def test_escape_cancels_the_reply_on_screen_even_with_another_of_mine_queued(big_context_daemon: Any) -> None:
    # UNBOUNDED: the first reply still generates when the second is queued and Esc lands, at any speed.
    conversation = await long_conversation(big_context_daemon.runtime_dir, UNBOUNDED["max_tokens"])
    app = attach(big_context_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await on_conversation(pilot, app, conversation)
        submit_while_streaming(app, "first")
        await until(pilot, lambda: any(r["status"] == "generating" for r in replies(app)))
        submit_while_streaming(app, "second")
        queue = app.query_one("#queue", Label)
        mine_behind_mine = "queued: 1 request(s) ahead of yours, including your reply that is generating"
        await until(pilot, lambda: text_of(queue) == mine_behind_mine)
        await pilot.press("escape")  # the first, generating on screen; not the second, queued
        await until(pilot, lambda: [r["status"] for r in replies(app)][:1] == ["cancelled"])
        await until(pilot, lambda: len(replies(app)) == 2)  # the queued request ran: that Esc left it alone
        await pilot.press("escape")  # stops it if it still runs, so the next test finds the daemon idle
        await until(pilot, lambda: replies(app)[1]["status"] != "generating")


async def test_a_resync_keeps_the_place_of_a_reader_scrolled_up(tiny_daemon: Any) -> None:
    conversation = await long_conversation(tiny_daemon.runtime_dir)
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await on_conversation(pilot, app, conversation)
        await type_and_send(pilot, app, "a long one")
        await until(pilot, lambda: any(r["status"] == "complete" for r in replies(app)), timeout=60)
        log = app.query_one("#log")
        await until(pilot, lambda: log.max_scroll_y > 10)
        log.scroll_to(y=3, animate=False, immediate=True)
        await pilot.pause()
        await app.apply_snapshot(await app.client.request("snapshot"))  # what a reconnect does
        # The place comes back after the redrawn log's first refresh: on a busy machine, later than one pause.
        await until(pilot, lambda: log.scroll_y == 3 and log.max_scroll_y > 10, timeout=10)
        await app.chat.show_conversation()  # a switch goes to the end
        await until(pilot, lambda: log.scroll_y == log.max_scroll_y)


async def test_keys_from_the_config_file_rebind_and_show_in_the_palette(
    tiny_daemon: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[keys]\ndashboard = "f9"\nteleport = "f10"\n')
    monkeypatch.setenv("VRAMCHAT_CONFIG", str(config))
    app = attach(tiny_daemon)
    notes: list[str] = []
    app.notify = lambda message, **_: notes.append(message)  # type: ignore[method-assign]
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        assert any("teleport: no such action" in note for note in notes)
        commands = {c.title: c.help for c in app.get_system_commands(app.screen)}
        assert commands["Memory dashboard"].startswith("f9:") and commands["Models"].startswith("f3:")
        await pilot.press("f2")  # no longer bound
        assert not isinstance(app.screen, DashboardScreen)
        await pilot.press("f9")
        assert isinstance(app.screen, DashboardScreen)


async def test_regenerate_replaces_the_last_reply(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await type_and_send(pilot, app, "hello")
        await until(pilot, lambda: any(r["status"] == "complete" for r in replies(app)))
        first = replies(app)[-1]["id"]
        await pilot.press("ctrl+r")
        await until(pilot, lambda: [r["status"] for r in replies(app)] == ["complete"] and replies(app)[-1]["id"] != first)
        assert [m.message["role"] for m in app.query(ChatMessage)] == ["user", "assistant"]


async def test_an_alarm_from_the_daemon_is_a_notification_and_shows_on_the_dashboard(tiny_daemon: Any) -> None:
    app = attach(tiny_daemon)
    notes: list[tuple[str, str]] = []
    app.notify = lambda message, severity="information", **_: notes.append((message, severity))  # type: ignore[method-assign]
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        alarm = {"kind": "swap_thrash", "active": True, "severity": "critical", "message": "the engine is swapping: 80 MiB/s in"}
        await app.apply_event("alarm", alarm)  # as the daemon publishes it
        assert (alarm["message"], "error") in notes
        await pilot.press("f2")
        await until(pilot, lambda: "ALARM the engine is swapping" in text_of(app.screen.query_one("#alarms")))
        await app.apply_event("alarm", {**alarm, "active": False})
        await until(pilot, lambda: text_of(app.screen.query_one("#alarms")) == "")


# --- the chat pane on its own, streaming Markdown, and an idle daemon -----------------------------


def blocks(markdown: Markdown) -> list[tuple[int, str, str]]:
    """Every block a Markdown widget shows, nested ones too: its depth, kind and text (a code block's with its language)."""
    found: list[tuple[int, str, str]] = []

    def walk(node: Any, depth: int) -> None:
        for child in node.children:
            kind = type(child).__name__
            if kind == "MarkdownFence":
                found.append((depth, kind, f"{child.lexer}: {child.query_one('#code-content', Label).render()}"))
            elif isinstance(child, MarkdownBlock):
                found.append((depth, kind, str(child.render())))
            walk(child, depth + 1)

    walk(markdown, 0)
    return found


CONVERSATION: dict[str, Any] = {"id": "c1", "title": "Streaming", "settings": {}, "system_prompt": None}
QUESTION: dict[str, Any] = {
    "id": "m1",
    "conversation_id": "c1",
    "role": "user",
    "status": "complete",
    "content": "Show me.",
    "stats": None,
}
FIXED_SNAPSHOT: dict[str, Any] = {
    "epoch": "e",
    "seq": 1,
    "model": {"state": "ready", "name": "tiny.gguf"},
    "clients": 1,
    "in_flight": None,
    "queue": {"running": None, "pending": []},
    "conversations": [CONVERSATION],
    "telemetry": {"history": []},
    "alarms": [],
}


def shows(widget: ChatMessage, text: str) -> Callable[[], bool]:
    return lambda: widget.shown == text


def reply(status: str, content: str) -> dict[str, Any]:
    stats = {"generated_tokens": 9, "tokens_per_s": 30.0, "ttft_s": 0.1} if status == "complete" else None
    return {"id": "m2", "conversation_id": "c1", "role": "assistant", "status": status, "content": content, "stats": stats}


@pytest.mark.parametrize(
    "pieces",
    [
        # A loose numbered list whose "2" comes a frame before its ". two", then a code block left open.
        ["Here:\n\n", "1. one\n\n", "2", ". two\n\n", "- three\n", "- four\n\n", "```python\n", "print(1)\n"],
        # A reply that opens with a code block: its indentation must survive.
        ["```python\n", "def f():\n", "    return 1\n"],
        ["Here:\n\n- one\n", "- two\n\n```py", "thon\nprint(1)\n"],
    ],
    ids=["loose-list-then-code", "code-first", "list-then-code"],
)
async def test_a_streamed_reply_ends_as_a_fresh_render_of_the_stored_text(pieces: list[str]) -> None:
    client = StubClient(FIXED_SNAPSHOT, {"c1": [QUESTION]})
    app = VramchatApp(client)
    async with app.run_test(size=(80, 40)) as pilot:
        await until(pilot, lambda: app.connected and len(app.query(ChatMessage)) == 1)
        client.publish("msg", reply("generating", ""))
        await until(pilot, lambda: app.chat.message_widget("m2") is not None)
        widget = app.chat.message_widget("m2")
        assert widget is not None
        text = ""
        for piece in pieces:  # one frame each, so that each piece is one Markdown.append
            text += piece
            client.publish("tok", {"message": "m2", "conversation": "c1", "request": "r", "text": piece})
            await until(pilot, shows(widget, text))
        client.publish("msg", reply("complete", text))
        await until(pilot, lambda: widget.message["status"] == "complete")
        await until(pilot, lambda: all(w.is_finished for w in app.workers if w.group == "settle"))
        fresh = Markdown(text)
        await app.chat.message_log.mount(fresh)
        await pilot.pause()
        assert blocks(widget.body) == blocks(fresh) and blocks(fresh)
        assert widget.body.source == text


async def test_the_chat_pane_draws_what_the_state_says_changed_in_a_small_host_app() -> None:
    state = ChatState()
    fetched: list[str] = []

    async def fetch(conversation: str) -> list[dict[str, Any]]:
        fetched.append(conversation)
        return [QUESTION, reply("generating", "")]

    class Host(App[None]):
        def compose(self) -> ComposeResult:
            yield ChatView(state, fetch)

    async with Host().run_test(size=(80, 24)) as pilot:
        chat = pilot.app.query_one(ChatView)
        in_flight = {"message": "m2", "conversation": "c1", "text": "Hel"}
        await chat.redraw(state.apply_snapshot({**FIXED_SNAPSHOT, "in_flight": in_flight}))
        assert fetched == ["c1"] and [w.shown for w in chat.query(ChatMessage)] == ["Show me.", "Hel"]
        for text in ("lo", " there"):
            await chat.redraw(state.apply_event("tok", {"message": "m2", "conversation": "c1", "text": text}))
        await until(pilot, lambda: chat.query(ChatMessage).last().shown == "Hello there")
        await chat.redraw(state.apply_event("msg", reply("complete", "Hello there.")))
        last = chat.query(ChatMessage).last()
        assert last.body.source == last.shown == "Hello there." and "30.0 tok/s" in text_of(last.meta)
        queue = chat.query_one("#queue", Label)
        await chat.redraw(state.apply_event("queue", {"running": {"request": "x", "conversation": "c2"}, "pending": []}))
        assert queue.display and text_of(queue) == "another client's reply is generating"
        await chat.redraw(state.apply_event("queue", {"running": None, "pending": []}))
        assert not queue.display
        await chat.redraw(state.apply_event("msg", {**reply("deleted", ""), "id": "m1"}))
        assert [w.message["id"] for w in chat.query(ChatMessage)] == ["m2"]
        await chat.redraw(state.apply_event("conversation", {"action": "deleted", "conversation": CONVERSATION}))
        assert not chat.query(ChatMessage) and "Type a message" in text_of(chat.query_one(".hint"))


async def test_an_idle_app_stays_connected_to_a_daemon_that_publishes_telemetry_every_5_s(
    daemon_factory: Callable[..., Any], models_dir: Path
) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), "--telemetry-interval", "5")
    app = attach(daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        assert app.client.server.get("telemetry_interval_s") == 5.0
        states: list[bool] = []
        deadline = asyncio.get_running_loop().time() + 12
        while asyncio.get_running_loop().time() < deadline:
            states.append(app.connected and app.sub_title.startswith("connected"))
            await pilot.pause(0.25)
        assert all(states) and len(states) > 20
