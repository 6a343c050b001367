"""The chat pane: the message log, the queue line and the prompt, and the painter that streams tokens."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from vramchat.shared.client import RequestFailed
from vramchat.tui.state import Changes, ChatState, view_marker, view_start
from vramchat.tui.widgets import ChatMessage, MemoryBar, PromptInput

# Streamed text reaches the screen at most this often: the app's cost is set by the screen, not by
# the token rate. A frame costs far more than its Markdown append: Textual then lays out and
# renders the screen, 10 to 20 ms of CPU on a 2-core VM, and over SSH the app runs beside the
# llama threads, which lose what it takes (docs/benchmarks.md, tui_cost: at 30 frames a second
# one attached app cost the demo model 17% of its speed). Five frames a second still reads as
# live; the end of a reply is drawn when it arrives, unpaced.
FRAME_S = 0.2


@dataclass(frozen=True)
class FrameBudget:
    """How often to paint: after a frame, the wait for the next is the app's CPU time over the
    frame over `cpu_share`, between `FRAME_S` and `max_frame_s`. `tok` events are read in batches
    at most every `token_pace_s` (shared/client.py): each read wakes the app, which costs it a
    third of a millisecond of CPU, once per event otherwise."""

    cpu_share: float
    max_frame_s: float
    token_pace_s: float


# Where the engine's threads leave a core free, the app may take 5% of one, and paints at least
# four frames a second.
SPARE_CORE = FrameBudget(cpu_share=0.05, max_frame_s=0.25, token_pace_s=FRAME_S / 2)
# Where they fill every core, each millisecond the app spends is taken from a llama thread (about
# 1.4 ms of generation per ms): 2% of a core, and still at least one frame a second, so that the
# reply reads as live (docs/benchmarks.md, tui_cost).
NO_SPARE_CORE = FrameBudget(cpu_share=0.02, max_frame_s=1.0, token_pace_s=0.5)


def frame_budget(model: dict[str, Any], cpus: int) -> FrameBudget:
    """The budget for a machine with `cpus` CPUs, running the engine that `model` describes (its
    `n_threads`; a TUI attached to vramchatd runs on the daemon's machine)."""
    threads = model.get("n_threads")
    return NO_SPARE_CORE if isinstance(threads, int) and threads >= cpus else SPARE_CORE


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


Fetch = Callable[[str], Awaitable[list[dict[str, Any]]]]
Painted = Callable[[dict[str, list[str]]], None]
HINT = "Type a message below and press Enter (Ctrl+J: new line). Ctrl+P lists every command."


class ChatView(Vertical):
    """Draws the conversation on screen from a `ChatState`, and changes nothing in it but what is
    left to paint. Like oterm's chat, it streams Markdown in pieces and stops following the end
    while the user reads older messages.

    `fetch` reads a conversation's stored messages from the daemon; `painted` is told each frame's
    text once it is in the log (benchmarks/tui_lag.py times it).
    """

    def __init__(self, state: ChatState, fetch: Fetch, painted: Painted | None = None) -> None:
        super().__init__(id="chat")
        self.state = state
        self.fetch = fetch
        self.painted = painted
        self.paint_wanted = asyncio.Event()
        self.drawing = asyncio.Lock()  # one writer at a time in the message log

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="log")
        yield Label("", id="queue")
        yield PromptInput(id="prompt")

    def on_mount(self) -> None:
        self.message_log.anchor()  # follow new text until the user scrolls up
        self.run_worker(self.paint_tokens(), group="paint", exit_on_error=False)

    @property
    def message_log(self) -> VerticalScroll:
        return self.query_one("#log", VerticalScroll)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    async def redraw(self, changes: Changes) -> None:
        """Redraw what `changes` says changed in the conversation on screen."""
        if changes.log:
            await self.show_conversation(resync=changes.snapshot)
        elif changes.message is not None:
            await self.show_message(changes.message)
        if changes.tokens:
            self.paint_wanted.set()
        if changes.queue:
            self.show_queue()

    async def show_conversation(self, resync: bool = False) -> None:
        """Redraw the log from the store, with the text generated so far for a reply in flight.

        On a resync, a user reading older messages keeps their place; otherwise the log follows the end."""
        log = self.message_log
        reading_at = log.scroll_y if resync and log.scroll_y < log.max_scroll_y else None
        async with self.drawing:
            await log.remove_children()
            if self.state.current is None:
                await log.mount(Static(HINT, classes="hint"))
                return
            try:
                messages = await self.fetch(self.state.current)
            except RequestFailed:
                return
            await log.mount_all([ChatMessage(m) for m in self.state.with_in_flight(messages)])
            await self._mark_view_start(view_start(messages))
            if reading_at is None:
                log.anchor()
            else:
                log.release_anchor()
                self.call_after_refresh(log.scroll_to, y=reading_at, animate=False, immediate=True)

    async def show_message(self, message: dict[str, Any]) -> None:
        """A message of the conversation on screen was created, finished or deleted."""
        async with self.drawing:
            widget = self.message_widget(message["id"])
            if message["status"] == "deleted":
                if widget is not None:
                    await widget.remove()
            elif widget is None:
                await self.message_log.mount(ChatMessage(message))
            elif message["status"] != "generating":
                await widget.finish(message)
                if (context := (message.get("stats") or {}).get("context")) is not None:
                    await self._mark_view_start(context)

    async def _mark_view_start(self, view: dict[str, Any] | None) -> None:
        """The line above the first message in the model's view; the drawing lock is held."""
        await self.query(".view-start").remove()
        first = self.message_widget(view["first_message"]) if view else None
        if view is not None and first is not None:
            await self.message_log.mount(Static(view_marker(view["dropped"]), classes="view-start"), before=first)

    async def paint_tokens(self) -> None:
        """Draw what arrived since the last frame, in one Markdown append per message, forever.

        After a frame, the wait for the next is set by the app's CPU time over the frame (the
        append, the layout and rendering Textual does after it, the events read meanwhile) and
        the `frame_budget` for the engine that runs; it is the budget's longest while the user
        reads older messages."""
        cpus = usable_cpus()
        while True:
            await self.paint_wanted.wait()
            budget = frame_budget(self.state.model, cpus)
            while self.hidden():
                await asyncio.sleep(budget.max_frame_s)
            self.paint_wanted.clear()
            started, cpu_started = time.monotonic(), time.process_time()
            async with self.drawing:
                pending = self.state.take_unpainted()
                flight = self.state.in_flight
                for message_id, parts in pending.items():
                    widget = self.message_widget(message_id)
                    if widget is not None:
                        progress = flight.progress() if flight and flight.message == message_id else None
                        await widget.append("".join(parts), progress)
                for bar in self.screen.query(MemoryBar):
                    bar.draw_waiting()  # in this frame's layout, not one of its own
            if self.painted is not None:
                self.painted(pending)
            await asyncio.sleep(FRAME_S)  # Textual lays out and renders the frame meanwhile
            paced = min(budget.max_frame_s, (time.process_time() - cpu_started) / budget.cpu_share)
            if self.reading_older():  # the end of the log, where the reply grows, is out of view
                paced = budget.max_frame_s
            await asyncio.sleep(max(0.0, paced - (time.monotonic() - started)))

    def reading_older(self) -> bool:
        """The user scrolled up from the end of the log."""
        log = self.message_log
        return log.scroll_y < log.max_scroll_y

    def hidden(self) -> bool:
        """Another screen covers the chat (the dashboard, the models screen): its text is painted
        when the chat shows again, not while nobody sees it. A dialog leaves the chat in view."""
        top = self.app.screen
        return top is not self.screen and not isinstance(top, ModalScreen)

    def message_widget(self, message_id: str) -> ChatMessage | None:
        for widget in self.query(ChatMessage):
            if widget.message["id"] == message_id:
                return widget
        return None

    def show_queue(self) -> None:
        text = self.state.queue_text()
        label = self.query_one("#queue", Label)
        label.update(text)
        label.display = bool(text)
