"""Widgets of the chat screen: the prompt, one message, the chat list, the memory bar, and their text."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar, cast

from markdown_it import MarkdownIt
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.dom import DOMNode
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Label, ListItem, ListView, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownBlock

from vramchat.shared import thinking
from vramchat.shared.units import format_bytes
from vramchat.tui.message_keys import MessageKeys
from vramchat.tui.telemetry_view import rpc_devices, rpc_used, swapping
from vramchat.tui.thinking_view import ThinkingFold, grow

if TYPE_CHECKING:
    from vramchat.tui.app import VramchatApp

# The tokens that Textual's Markdown makes a top-level block of (MarkdownBlock.name is their type).
BLOCK_TOKENS = frozenset(
    {
        "heading_open",
        "hr",
        "paragraph_open",
        "blockquote_open",
        "bullet_list_open",
        "ordered_list_open",
        "table_open",
        "fence",
        "code_block",
    }
)


class StateChanged(Message):
    """The app's copy of the daemon state (model, telemetry, alarms) changed; screens redraw."""


def vramchat_app(node: DOMNode) -> VramchatApp:
    """The app a screen or widget of this package runs in, typed (they only run in VramchatApp)."""
    return cast("VramchatApp", node.app)


def _keys_of(binding: Any) -> str:
    return binding.key if isinstance(binding, Binding) else binding[0]


class PromptInput(TextArea, inherit_bindings=False):
    """Enter sends; Ctrl+J (and Shift+Enter where the terminal reports it) adds a newline; ↑ in an
    empty prompt goes to the last message.

    TextArea's F6 (select line) and F7 (select all) are left out: the app uses the F keys. Its
    cursor does not blink: each blink renders the screen, 7 ms of CPU a second in an idle app,
    taken from the llama threads on a machine they fill (docs/benchmarks.md, tui_cost).
    """

    BINDINGS: ClassVar[list[BindingType]] = [b for b in TextArea.BINDINGS if _keys_of(b) not in ("f6", "f7")]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cursor_blink = False

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
        elif event.key in ("ctrl+j", "shift+enter"):
            event.prevent_default()
            event.stop()
            self.insert("\n")
        elif event.key == "up" and not self.text:  # an empty prompt has nowhere to go up to: the messages
            event.prevent_default()
            event.stop()
            await self.app.run_action("focus_messages")


class ChatMessage(MessageKeys):
    """One message: its Markdown body and, for replies, a status and stats line. A reply that opens
    with a reasoning block shows it in a `ThinkingFold` above the answer (shared/thinking.py). It
    takes the focus, and then its keys (MessageKeys): copy, edit, regenerate, versions."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(classes=f"message {message['role']}")
        self.message = message
        self.shown = message["content"] or ""  # the message's text so far, as stored
        parts = self._split(self.shown)
        self.answer = parts.answer  # the text in `body`, which is its Markdown source
        self.body = Markdown(self.answer)
        closed = parts.closed or message["status"] != "generating"
        self.fold = None if parts.thinking is None else ThinkingFold(parts.thinking, closed, thinking_stats(message))
        self.meta = Label(describe_reply(message), classes="meta")

    def compose(self) -> ComposeResult:
        if self.fold is not None:
            yield self.fold
        yield self.body
        if self.message["role"] == "assistant":
            yield self.meta

    async def append(self, text: str, progress: dict[str, Any] | None = None) -> None:
        """More streamed text. Markdown.append re-parses only from the last block on, so a frame's
        worth of tokens is cheap. `progress` ({"tokens", "seconds"} of the reply so far) titles a
        reasoning block that ends in this text."""
        await self._show(self.shown + text, progress, ended=False)

    async def _show(self, text: str, stats: dict[str, Any] | None, ended: bool) -> None:
        """Show `text`, the reply's so far; once it has `ended`, a block it left open folds too."""
        parts = self._split(text)
        if parts.thinking is not None:
            closed = parts.closed or ended
            if self.fold is None:
                self.fold = ThinkingFold(parts.thinking, closed, stats)
                await self.mount(self.fold, before=self.body)
            else:
                await self.fold.show(parts.thinking, closed, stats)
        await grow(self.body, self.answer, parts.answer)
        self.answer = parts.answer
        self.shown = text

    def _split(self, text: str) -> thinking.Parts:
        """A reply's text at its reasoning block; a question's is all answer, whatever it starts with."""
        return thinking.split(text) if self.message["role"] == "assistant" else thinking.Parts(None, text, True)

    async def finish(self, message: dict[str, Any]) -> None:
        """The stored message is the truth. It usually extends what was streamed, so only the rest is
        appended; re-parsing a whole long reply would hold the screen back by tens of milliseconds.
        `settle` then checks, off that path, that appending left no block behind. The stats line
        changes last, so a screen that shows them shows the whole reply."""
        self.message = message
        await self._show(message["content"] or "", thinking_stats(message), ended=message["status"] != "generating")
        self.settle()
        self.meta.update(describe_reply(message))

    @work(exclusive=True, group="settle", exit_on_error=False)
    async def settle(self) -> None:
        """Draw the text afresh if appending left block state behind that a fresh render does not
        have: "2" then ". two" after a loose list starts a second list, a paragraph before an HTML
        line is lost. Its blocks are compared with a parse of the text, made in a thread."""
        for markdown, text in ((self.body, self.answer), *(((self.fold.markdown, self.fold.shown),) if self.fold else ())):
            fresh = await asyncio.to_thread(markdown_blocks, text)
            if fresh != shown_blocks(markdown) and text == markdown.source:
                await markdown.update(text)


def thinking_stats(message: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's count of a finished reply's reasoning tokens and seconds."""
    stats: dict[str, Any] | None = (message.get("stats") or {}).get("thinking")
    return stats


def markdown_blocks(text: str) -> list[tuple[str, tuple[int, int]]]:
    """The top-level blocks of a fresh render of `text`: the type of each one's first token, and its lines."""
    return [
        (token.type, (token.map[0], token.map[1]))
        for token in MarkdownIt("gfm-like").parse(text)
        if token.level == 0 and token.map is not None and token.type in BLOCK_TOKENS
    ]


def shown_blocks(body: Markdown) -> list[tuple[str, tuple[int, int]]]:
    """The top-level blocks `body` shows, as `markdown_blocks` describes them."""
    return [(block.name or "", block.source_range) for block in body.children if isinstance(block, MarkdownBlock)]


class ConversationList(ListView):
    """The conversations, newest first, with the one on screen highlighted; / searches them all."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("slash", "app.search", "Search", show=False)]  # footer: 80 columns

    async def show(self, conversations: list[dict[str, Any]], current: str | None) -> None:
        await self.clear()
        await self.extend(ListItem(Label(c["title"][:60]), name=c["id"]) for c in conversations)
        ids = [c["id"] for c in conversations]
        if current in ids:
            self.index = ids.index(current)


def describe_reply(message: dict[str, Any]) -> str:
    """The line under a reply: its status unless complete, then tokens, tok/s and first-token time."""
    if message["role"] != "assistant":
        return ""
    if message["status"] == "generating":
        return "generating… (Esc cancels)"
    stats = message.get("stats") or {}
    error = f": {message['error']}" if message.get("error") else ""
    parts = [] if message["status"] == "complete" else [f"{message['status']}{error}"]
    if stats.get("generated_tokens"):
        speed = f", {stats['tokens_per_s']:.1f} tok/s" if stats.get("tokens_per_s") else ""
        first = f", first token {stats['ttft_s'] * 1000:.0f} ms" if stats.get("ttft_s") else ""
        parts.append(f"{stats['generated_tokens']} tokens{speed}{first}")
    return " · ".join(parts)


def layer_split(model: dict[str, Any]) -> str:
    """ "24/31 layers on GPU" from what llama.cpp reported, else from what was asked for."""
    split = model.get("split") or {}
    if split.get("offloaded_layers") is not None:
        return f"{split['offloaded_layers']}/{split['total_layers']} layers on GPU"
    if model.get("n_gpu_layers") is not None:
        return f"{model['n_gpu_layers']} GPU layers"
    return "no split"


def memory_bar_text(sample: dict[str, Any] | None, model: dict[str, Any]) -> str:
    """Console markup, one or two lines: VRAM per GPU, RAM, swap (red while swapping), model and split, tok/s."""
    if model.get("state") == "loading":
        state = f"loading {(model.get('progress') or 0) * 100:.0f}%"
    elif model.get("state") == "unloaded":
        state = "unloaded, loads again on the next message"
    else:
        state = model.get("state") or "no model"
    model_part = f"{model.get('name') or 'no model'} ({state}, {layer_split(model)})"
    if sample is None:
        return f"memory: waiting for the first sample │ {model_part}"
    host = sample["host"]
    gpus = " ".join(f"GPU{g['index']} {format_bytes(g['memory_used'])}/{format_bytes(g['memory_total'])}" for g in sample["gpus"])
    remote = " ".join(
        f"{device['name']} {format_bytes(rpc_used(device))}/{format_bytes(device.get('memory_total'))}"
        for device in rpc_devices(sample)
    )
    gpus = " ".join(part for part in (gpus, remote) if part)
    swap = f"swap {format_bytes(host['swap_used'])}"
    if swapping(sample):
        swap = f"[b white on red] {swap} SWAPPING [/]"
    generation = sample.get("generation") or {}
    speed = generation.get("tokens_per_s") or (generation.get("last") or {}).get("tokens_per_s")
    ram = f"RAM {format_bytes(host['ram_used'])}/{format_bytes(host['ram_total'])}"
    return f"{gpus or sample.get('gpu_status') or 'no NVIDIA GPU'} │ {ram} │ {swap} │ {model_part}" + (
        f" │ {speed:.1f} tok/s" if speed else ""
    )


# While a reply streams, the memory bar is drawn with the chat's frames, whose layout and render
# then serve both (each draw of its own lays out and renders the screen, CPU taken from the llama
# threads: docs/benchmarks.md, tui_cost); where no frame comes, after this long.
BAR_STREAMING_PERIOD_S = 3.0


class MemoryBar(Static):
    """Always visible, on every screen; the app updates each one. It is drawn only when its text
    changes; while a reply streams, by the chat's next frame (`draw_waiting`) or at the latest
    `BAR_STREAMING_PERIOD_S` later."""

    drawn: tuple[str, bool] | None = None  # the text and swapping flag on screen
    waiting: tuple[str, bool] | None = None  # the latest, not drawn yet
    timer: Timer | None = None

    def show(self, sample: dict[str, Any] | None, model: dict[str, Any], streaming: bool = False) -> None:
        self.waiting = (memory_bar_text(sample, model), sample is not None and swapping(sample))
        if not streaming:
            self.draw_waiting()
        elif self.timer is None:
            self.timer = self.set_timer(BAR_STREAMING_PERIOD_S, self.draw_waiting)

    def draw_waiting(self) -> None:
        if self.timer is not None:
            self.timer.stop()
        self.timer, shown, self.waiting = None, self.waiting, None
        if shown is None or shown == self.drawn:
            return
        self.drawn = shown
        self.update(shown[0])
        self.set_class(shown[1], "swapping")
