"""What an attached app spends while a reply streams: its frame budget and the memory bar's redraws."""

from __future__ import annotations

from typing import Any

import pytest
from test_tui_app import FIXED_SNAPSHOT, until
from test_tui_snapshots import sample
from textual.app import App, ComposeResult
from tui_stub import StubClient

from vramchat.tui import widgets
from vramchat.tui.app import VramchatApp
from vramchat.tui.chat import NO_SPARE_CORE, SPARE_CORE, frame_budget
from vramchat.tui.widgets import MemoryBar, PromptInput

MODEL = {"state": "ready", "name": "demo.gguf", "n_threads": 2}


def test_frames_are_rarer_where_the_engine_threads_fill_every_core() -> None:
    assert frame_budget(MODEL, cpus=2) == NO_SPARE_CORE
    assert frame_budget(MODEL, cpus=16) == SPARE_CORE
    assert frame_budget({"state": "unloaded"}, cpus=2) == SPARE_CORE  # no engine runs
    assert NO_SPARE_CORE.cpu_share < SPARE_CORE.cpu_share
    assert NO_SPARE_CORE.max_frame_s <= 1.0  # still at least a frame a second: it reads as live


class BarApp(App[None]):
    def compose(self) -> ComposeResult:
        yield MemoryBar("memory: waiting for the daemon")
        yield PromptInput()


async def test_the_memory_bar_is_drawn_when_its_text_changes_and_with_the_frames_while_streaming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(widgets, "BAR_STREAMING_PERIOD_S", 3600.0)  # its own timer does not run out here
    app = BarApp()
    async with app.run_test():
        bar = app.query_one(MemoryBar)
        drawn: list[str] = []
        update = bar.update

        def counting_update(content: Any = "", *, layout: bool = True) -> None:
            drawn.append(str(content))
            update(content, layout=layout)

        bar.update = counting_update  # type: ignore[method-assign]
        bar.show(sample(0), MODEL)
        bar.show(sample(0), MODEL)  # the same text: not drawn again
        assert len(drawn) == 1
        streaming = {**sample(0), "generation": {"generating": True, "tokens_per_s": 101.5}}
        bar.show(streaming, MODEL, streaming=True)
        bar.show({**streaming, "generation": {"generating": True, "tokens_per_s": 99.5}}, MODEL, streaming=True)
        assert len(drawn) == 1 and bar.timer is not None  # it waits for the chat's next frame
        bar.draw_waiting()  # what the frame does (or the timer, where no frame comes)
        assert len(drawn) == 2 and "99.5 tok/s" in drawn[-1] and bar.timer is None


async def test_the_prompt_cursor_does_not_blink() -> None:
    """Each blink renders the screen: CPU taken from the llama threads by an idle app."""
    app = BarApp()
    async with app.run_test():
        assert app.query_one(PromptInput).cursor_blink is False


async def test_the_app_reads_tok_events_less_often_where_the_engine_fills_every_core() -> None:
    """The client's pace follows the model the daemon reports: its `n_threads` against this machine's CPUs."""
    busy = {**FIXED_SNAPSHOT, "model": {**FIXED_SNAPSHOT["model"], "n_threads": 1 << 20}}
    app = VramchatApp(StubClient(busy))
    assert app.client.token_pace_s == SPARE_CORE.token_pace_s
    async with app.run_test() as pilot:
        await until(pilot, lambda: app.connected)
        assert app.client.token_pace_s == NO_SPARE_CORE.token_pace_s > SPARE_CORE.token_pace_s
