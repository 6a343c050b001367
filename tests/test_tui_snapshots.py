"""Snapshots of the chat screen, the dashboard, the models screen and the load dialog at 80x24
and 120x40, and of `vramchat models` at 80 and 120 columns.

The app follows a stand-in client instead of a daemon: it serves one fixed snapshot body
(conversations, messages, telemetry history, model), so nothing time-dependent reaches the screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import LONG_MODEL_NAME
from textual.widgets import DataTable
from tui_stub import StubClient

from vramchat.shared import speed
from vramchat.tui import cli
from vramchat.tui.app import VramchatApp
from vramchat.tui.commands import models as models_cmd
from vramchat.tui.dashboard import DashboardScreen
from vramchat.tui.models_screen import LoadDialog, ModelsScreen
from vramchat.tui.widgets import ChatMessage, MemoryBar

SIZES = [(80, 24), (120, 40)]
GIB = 1 << 30


def sample(i: int) -> dict[str, Any]:
    """A GPU that fills up, RAM and a little swap activity; sample i of a fixed history."""
    return {
        "t": 1_700_000_000 + i / 2,
        "gpu_status": "ok",
        "gpus": [
            {
                "index": 0,
                "name": "NVIDIA GeForce RTX 3060",
                "memory_total": 12 * GIB,
                "memory_used": (6 + i % 5) * GIB,
                "memory_free": (6 - i % 5) * GIB,
                "utilization": 20 * (i % 5),
                "temperature": 61,
                "power_w": 120.0,
                "engine_memory": 5 * GIB,
                "other_memory": GIB,
            }
        ],
        "host": {
            "ram_total": 32 * GIB,
            "ram_available": 20 * GIB,
            "ram_used": (10 + i % 3) * GIB,
            "page_cache": 4 * GIB,
            "swap_total": 8 * GIB,
            "swap_used": GIB // 4,
            "swap_in_bps": 0.0 if i < 19 else 4e6,
            "swap_out_bps": 0.0,
        },
        "engine": {"pid": 4242, "rss": 9 * GIB, "model_file_resident": 7 * GIB, "anon_resident": 2 * GIB},
        "generation": {"generating": False, "tokens_per_s": None, "last": {"tokens_per_s": 11.4}},
    }


MODEL: dict[str, Any] = {
    "state": "ready",
    "name": "Qwen2.5-14B-Instruct-Q4_K_M.gguf",
    "path": "/models/Qwen2.5-14B-Instruct-Q4_K_M.gguf",
    "n_gpu_layers": 24,
    "n_ctx": 4096,
    "progress": 1.0,
    "plan": {"prediction": {"gpu": {"total": int(5.2 * GIB)}, "cpu": {"total": int(3.1 * GIB)}}},
    "split": {
        "offloaded_layers": 24,
        "total_layers": 49,
        "gpu_bytes": int(5.0 * GIB),
        "cpu_bytes": int(3.3 * GIB),
        "buffers": [],
    },
}
MESSAGES = [
    {
        "id": "m1",
        "conversation_id": "c1",
        "position": 0,
        "role": "user",
        "content": "How do I reverse a list in Python?",
        "status": "complete",
        "stats": None,
        "error": None,
    },
    {
        "id": "m2",
        "conversation_id": "c1",
        "position": 1,
        "role": "assistant",
        "status": "complete",
        "error": None,
        "content": "Use **slicing** or `reversed()`:\n\n```python\nitems[::-1]\nlist(reversed(items))\n```\n\n"
        "- `items.reverse()` works in place.",
        "stats": {"prompt_tokens": 31, "generated_tokens": 42, "ttft_s": 0.412, "tokens_per_s": 11.4},
    },
]
SNAPSHOT = {
    "epoch": "e",
    "seq": 1,
    "model": MODEL,
    "clients": 2,
    "in_flight": None,
    "queue": {"running": None, "pending": []},
    "conversations": [
        {"id": "c1", "title": "Reversing lists", "settings": {}, "system_prompt": None},
        {"id": "c2", "title": "Rust lifetimes", "settings": {}, "system_prompt": None},
    ],
    "telemetry": {"latest": sample(19), "history": [sample(i) for i in range(20)]},
    "alarms": [],
}


def models_reply(directory: Path) -> dict[str, Any]:
    """The daemon's `models`: a 40-character K-quant, a Q4_0, and the loaded model, whose path
    this machine cannot read (as with a daemon on another machine)."""
    local = [
        {"name": name, "path": str(directory / name), "size_bytes": (directory / name).stat().st_size, "loaded": False}
        for name in (LONG_MODEL_NAME, "Llama-3.2-1B-Instruct-Q4_0.gguf")
    ]
    elsewhere = {"name": MODEL["name"], "path": MODEL["path"], "size_bytes": int(8.37 * GIB), "loaded": True}
    return {
        "models": [{**model, "source": "/home/me/models"} for model in (*local, elsewhere)],
        "model_dirs": ["/home/me/models"],
    }


def without_gpus(i: int) -> dict[str, Any]:
    return {**sample(i), "gpus": [], "gpu_status": "no NVIDIA GPU"}


class FixedApp(VramchatApp):
    def __init__(
        self, replies: dict[str, dict[str, Any]] | None = None, gpu: bool = True, messages: list[dict[str, Any]] = MESSAGES
    ) -> None:
        snapshot = SNAPSHOT
        if not gpu:
            snapshot = {**SNAPSHOT, "telemetry": {"latest": without_gpus(19), "history": [without_gpus(i) for i in range(20)]}}
        super().__init__(StubClient(snapshot, {"c1": messages, "c2": []}, replies))

    async def feed(self, pilot: Any) -> None:
        """Wait until the fixed snapshot is on screen: the memory bar is the last thing it draws."""
        while not (self.query(ChatMessage) and MODEL["name"] in str(self.query_one(MemoryBar).render())):
            await pilot.pause(0.02)


@pytest.fixture(autouse=True)
def fixed_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VRAMCHAT_CONFIG", str(tmp_path / "none.toml"))  # no [keys] from the user's config
    monkeypatch.setattr(speed, "ram_bandwidth", lambda: 20e9)
    monkeypatch.setattr(speed, "cpu_speed", lambda: speed.CpuSpeed(1e11, 2))  # measured per machine otherwise


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.app.feed(pilot)
        await pilot.pause()

    assert snap_compare(FixedApp(), terminal_size=size, run_before=run_before)


def test_chat_screen_with_a_focused_reply(snap_compare: Any) -> None:
    """At 80 columns: the reply's second version of two (shown as 2/2 between angle quotes), and the footer with the keys of
    the focused reply in place of the app's."""
    versions = {"index": 2, "count": 2, "ids": ["m0", "m2"]}

    async def run_before(pilot: Any) -> None:
        await pilot.app.feed(pilot)
        reply = pilot.app.chat.message_widget("m2")
        while not reply.query(".versions"):
            await pilot.pause(0.02)
        reply.focus()
        await pilot.pause()

    app = FixedApp(messages=[MESSAGES[0], {**MESSAGES[1], "versions": versions}])
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


THOUGHT_REPLY = {
    **MESSAGES[1],
    "content": "<think>\nThe user wants a reversed list. Slicing makes a copy; reverse() works in place.\n</think>\n\n"
    "Use **slicing**: `items[::-1]`.",
    "stats": {
        "prompt_tokens": 31,
        "generated_tokens": 42,
        "ttft_s": 0.412,
        "tokens_per_s": 11.4,
        "thinking": {"tokens": 412, "seconds": 9.8},
    },
}


def test_a_reply_with_its_reasoning(snap_compare: Any) -> None:
    """The reasoning block folds into one line above the answer. (Unfolding it is a pilot test,
    tests/test_thinking.py: a snapshot of the unfolded block came out laid out two ways, by run.)"""
    app = FixedApp()
    app.client.messages["c1"] = [MESSAGES[0], THOUGHT_REPLY]  # type: ignore[attr-defined]

    async def run_before(pilot: Any) -> None:
        await pilot.app.feed(pilot)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dashboard(snap_compare: Any, size: tuple[int, int]) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.app.feed(pilot)
        await pilot.app.push_screen(DashboardScreen())
        await pilot.pause()

    assert snap_compare(FixedApp(), terminal_size=size, run_before=run_before)


def open_load_dialog(models_dir: Path) -> Any:
    async def run_before(pilot: Any) -> None:
        await pilot.app.feed(pilot)
        dialog = LoadDialog({"name": "tiny-gqa.gguf", "path": str(models_dir / "tiny-gqa.gguf")}, 3, 2048)
        await pilot.app.push_screen(dialog)
        while dialog.info is None:
            await pilot.pause(0.05)
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_load_dialog(snap_compare: Any, size: tuple[int, int], models_dir: Path) -> None:
    assert snap_compare(FixedApp(), terminal_size=size, run_before=open_load_dialog(models_dir))


def test_load_dialog_without_a_gpu(snap_compare: Any, models_dir: Path) -> None:
    """The note that GPU layers do nothing here, in place of VRAM against a 0 B budget; no budget field."""
    assert snap_compare(FixedApp(gpu=False), terminal_size=(80, 24), run_before=open_load_dialog(models_dir))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_models_screen(snap_compare: Any, size: tuple[int, int], named_models_dir: Path) -> None:
    """At 80 columns the 40-character name and the quantization (Q4_K_M) show whole; columns go instead."""

    async def run_before(pilot: Any) -> None:
        await pilot.app.feed(pilot)
        await pilot.app.push_screen(ModelsScreen())
        table = pilot.app.screen.query_one(DataTable)
        while table.row_count < 3:
            await pilot.pause(0.05)
        await pilot.pause()

    assert snap_compare(FixedApp({"models": models_reply(named_models_dir)}), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("columns", [80, 120])
def test_models_command(
    columns: int, named_models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], snapshot: Any
) -> None:
    replies = {"models": models_reply(named_models_dir), "status": {"telemetry": sample(19)}}
    monkeypatch.setattr(models_cmd, "open_client", lambda _args, _name: StubClient(SNAPSHOT, replies=replies))
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("HOME", "/home/me")
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= columns
    assert out == snapshot
