"""The Textual app: chat with streaming Markdown, an always-visible memory bar, a dashboard.

All state comes from the daemon through `Client.stream()`: a snapshot, then events. After a gap
or a daemon restart a new snapshot replaces everything, so every attached app shows what the
daemon stored. What the user is typing is never touched by a resync.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, ListItem, ListView, Markdown, Sparkline, Static, TextArea

from vramchat.shared.client import Client, DaemonNotRunning, RequestFailed, Snapshot
from vramchat.shared.units import format_bytes
from vramchat.tui.telemetry_view import format_split, format_status

# Without an event for this long (telemetry comes every 0.5 s) the daemon is taken to be gone.
SILENCE_S = 3.0


class PromptInput(TextArea):
    """Enter sends; Ctrl+J adds a newline (Shift+Enter does not reach most terminals)."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: Any) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
        elif event.key == "ctrl+j":
            event.prevent_default()
            event.stop()
            self.insert("\n")


class ChatMessage(Vertical):
    """One message: its Markdown body and, for replies, a status and stats line."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(classes=f"message {message['role']}")
        self.message = message
        self.body = Markdown(message["content"] or " ")
        self.meta = Label(describe_reply(message), classes="meta")
        self.stream: Any = None

    def compose(self) -> ComposeResult:
        yield self.body
        if self.message["role"] == "assistant":
            yield self.meta

    async def append(self, text: str) -> None:
        """Stream text in pieces: MarkdownStream batches fragments instead of re-rendering per token."""
        if self.stream is None:
            self.stream = Markdown.get_stream(self.body)
        await self.stream.write(text)

    async def finish(self, message: dict[str, Any]) -> None:
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None
        self.message = message
        await self.body.update(message["content"] or " ")
        self.meta.update(describe_reply(message))


def describe_reply(message: dict[str, Any]) -> str:
    if message["role"] != "assistant":
        return ""
    if message["status"] == "generating":
        return "generating… (Esc cancels)"
    stats = message.get("stats") or {}
    parts = [] if message["status"] == "complete" else [f"{message['status']}: {message.get('error') or ''}"]
    if stats.get("generated_tokens"):
        speed = f", {stats['tokens_per_s']:.1f} tok/s" if stats.get("tokens_per_s") else ""
        first = f", first token {stats['ttft_s'] * 1000:.0f} ms" if stats.get("ttft_s") else ""
        parts.append(f"{stats['generated_tokens']} tokens{speed}{first}")
    return " · ".join(parts)


def memory_bar_text(sample: dict[str, Any] | None, model: dict[str, Any]) -> str:
    """One line: VRAM per GPU, RAM, swap (flagged while swapping), model and split, tok/s."""
    if sample is None:
        return "memory: waiting for the first sample"
    host = sample["host"]
    gpus = " ".join(f"GPU{g['index']} {format_bytes(g['memory_used'])}/{format_bytes(g['memory_total'])}" for g in sample["gpus"])
    swapping = (host["swap_in_bps"] or 0) > 1 << 20
    swap = f"swap {format_bytes(host['swap_used'])}" + (" [b red]SWAPPING[/]" if swapping else "")
    split = model.get("split") or {}
    layers = (f"{split['offloaded_layers']}/{split['total_layers']} layers on GPU" if split.get("offloaded_layers") is not None
              else f"{model.get('n_gpu_layers', 0)} GPU layers")
    speed = (sample.get("generation") or {}).get("tokens_per_s")
    return (f"{gpus or 'no NVIDIA GPU'} │ RAM {format_bytes(host['ram_used'])}/{format_bytes(host['ram_total'])} │ {swap} │ "
            f"{model.get('name') or 'no model'} ({model.get('state')}, {layers})" + (f" │ {speed:.1f} tok/s" if speed else ""))


class DashboardScreen(Screen[None]):
    BINDINGS = [Binding("escape,f2", "app.pop_screen", "Back to chat")]

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static(id="dashboard-status")
            for key, label in (("ram", "RAM used"), ("swap", "swap used"), ("swap_in", "swap-in per second"),
                               ("engine", "engine RSS"), ("tok_s", "tok/s"), ("gpu", "VRAM used (GPU 0)")):
                yield Label(label, classes="spark-label")
                yield Sparkline([], id=f"spark-{key}")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_from(self.app)  # type: ignore[arg-type]

    def refresh_from(self, app: "VramchatApp") -> None:
        history = app.history[-240:]
        series = {
            "ram": [s["host"]["ram_used"] for s in history],
            "swap": [s["host"]["swap_used"] for s in history],
            "swap_in": [s["host"]["swap_in_bps"] or 0 for s in history],
            "engine": [(s["engine"] or {}).get("rss", 0) for s in history],
            "tok_s": [(s.get("generation") or {}).get("tokens_per_s") or 0 for s in history],
            "gpu": [s["gpus"][0]["memory_used"] if s["gpus"] else 0 for s in history],
        }
        for key, values in series.items():
            self.query_one(f"#spark-{key}", Sparkline).data = values
        model = app.model
        self.query_one("#dashboard-status", Static).update(
            format_status(history[-1] if history else None, app.alarms) + "\n" + format_split(model.get("split"), model.get("n_gpu_layers"))
        )


class VramchatApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "vramchat"
    # priority: the prompt's TextArea binds many Ctrl keys (Ctrl+D deletes) and has the focus.
    BINDINGS = [
        Binding("ctrl+n", "new_conversation", "New chat", priority=True),
        Binding("escape", "cancel", "Cancel reply"),
        Binding("ctrl+r", "regenerate", "Regenerate", priority=True),
        Binding("f2", "dashboard", "Dashboard", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, runtime_dir: str | None = None) -> None:
        super().__init__()
        self.client = Client(runtime_dir, name="vramchat tui")
        self.conversations: list[dict[str, Any]] = []
        self.current: str | None = None
        self.model: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.alarms: list[dict[str, Any]] = []
        self.my_request: str | None = None
        self.connected = False
        self.clients = 0
        self.last_event = 0.0

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="memory-bar")
        with Horizontal():
            yield ListView(id="conversations")
            with Vertical(id="chat"):
                yield VerticalScroll(id="log")
                yield Label("", id="queue")
                yield PromptInput(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#log", VerticalScroll).anchor()  # follow new text unless the user scrolled up
        self.query_one(PromptInput).focus()
        self.follow_daemon()
        self.set_interval(1.0, self.check_connection)

    # --- the daemon ----------------------------------------------------------------------------

    @work(exclusive=True, group="daemon", exit_on_error=False)
    async def follow_daemon(self) -> None:
        """Attach, then apply snapshots and events for as long as the app runs; retry when gone."""
        while True:
            try:
                if self.client.control is None:
                    await self.client.connect()
                async for item in self.client.stream():
                    self.last_event = asyncio.get_running_loop().time()
                    self.set_connected(True)
                    if isinstance(item, Snapshot):
                        await self.apply_snapshot(item.body)
                    else:
                        await self.apply_event(item.topic, item.body)
            except (DaemonNotRunning, RequestFailed, asyncio.TimeoutError) as exc:
                self.set_connected(False, str(exc))
                await self.client.close()
                await asyncio.sleep(1.0)

    def check_connection(self) -> None:
        if self.connected and asyncio.get_running_loop().time() - self.last_event > SILENCE_S:
            self.set_connected(False, "no events from vramchatd; waiting for it to come back")

    def set_connected(self, connected: bool, reason: str = "") -> None:
        if connected == self.connected:
            return
        if not connected:
            self.notify(f"disconnected: {reason}", severity="warning")
        self.connected = connected
        self.show_connection(reason)

    def show_connection(self, reason: str = "") -> None:
        self.sub_title = (f"connected · {self.clients} client(s) attached" if self.connected
                          else f"disconnected, retrying: {reason}"[:80])

    async def apply_snapshot(self, body: dict[str, Any]) -> None:
        self.model = body["model"]
        self.history = list(body["telemetry"]["history"])
        self.alarms = list(body.get("alarms", []))
        self.conversations = body["conversations"]
        self.clients = body["clients"]
        self.show_connection()
        if self.current not in {c["id"] for c in self.conversations}:
            self.current = self.conversations[0]["id"] if self.conversations else None
        await self.show_conversation_list()
        await self.show_conversation(in_flight=body["in_flight"])
        self.update_memory_bar()

    async def apply_event(self, topic: str, body: dict[str, Any]) -> None:
        if topic == "telemetry":
            self.history.append(body)
            del self.history[:-1200]
            self.update_memory_bar()
            if isinstance(self.screen, DashboardScreen):
                self.screen.refresh_from(self)
        elif topic == "model":
            self.model = body
            self.update_memory_bar()
        elif topic == "clients":
            self.clients = body["count"]
            self.show_connection()
        elif topic == "alarm":
            self.alarms = [a for a in self.alarms if a["kind"] != body["kind"]] + ([body] if body["active"] else [])
            if body["active"]:
                self.notify(body["message"], severity="error" if body["severity"] == "critical" else "warning", timeout=10)
        elif topic == "conversation":
            await self.on_conversation_event(body)
        elif topic == "msg" and body["conversation_id"] == self.current:
            await self.on_message_event(body)
        elif topic == "tok" and body["conversation"] == self.current:
            widget = self.message_widget(body["message"])
            if widget is not None:
                await widget.append(body["text"])
        elif topic == "queue":
            self.show_queue(body)

    async def on_conversation_event(self, body: dict[str, Any]) -> None:
        conversation = body["conversation"]
        self.conversations = [c for c in self.conversations if c["id"] != conversation["id"]]
        if body["action"] != "deleted":
            self.conversations.insert(0, conversation)
        await self.show_conversation_list()

    async def on_message_event(self, message: dict[str, Any]) -> None:
        log = self.query_one("#log", VerticalScroll)
        widget = self.message_widget(message["id"])
        if message["status"] == "deleted":
            if widget is not None:
                await widget.remove()
        elif widget is None:
            await log.mount(ChatMessage(message))
        elif message["status"] != "generating":
            await widget.finish(message)

    def message_widget(self, message_id: str) -> ChatMessage | None:
        for widget in self.query(ChatMessage):
            if widget.message["id"] == message_id:
                return widget
        return None

    # --- drawing -------------------------------------------------------------------------------

    async def show_conversation_list(self) -> None:
        listing = self.query_one("#conversations", ListView)
        await listing.clear()
        for conversation in self.conversations:
            item = ListItem(Label(conversation["title"][:40]), name=conversation["id"])
            await listing.append(item)
        ids = [c["id"] for c in self.conversations]
        if self.current in ids:
            listing.index = ids.index(self.current)

    async def show_conversation(self, in_flight: dict[str, Any] | None = None) -> None:
        log = self.query_one("#log", VerticalScroll)
        await log.remove_children()
        if self.current is None:
            await log.mount(Static("Type a message below and press Enter. Ctrl+N starts a new chat.", classes="hint"))
            return
        try:
            data = await self.client.request("conversation.get", {"id": self.current})
        except RequestFailed:
            return
        messages = data["messages"]
        if in_flight and in_flight["conversation"] == self.current:
            messages = [{**m, "content": in_flight["text"]} if m["id"] == in_flight["message"] else m for m in messages]
        await log.mount_all([ChatMessage(m) for m in messages])
        log.scroll_end(animate=False)

    def show_queue(self, queue: dict[str, Any]) -> None:
        mine = next((job for job in queue["pending"] if job["request"] == self.my_request), None)
        running = queue["running"]
        text = ""
        if mine:
            text = f"queued: {mine['position']} request(s) ahead of yours"
        elif running and running["request"] != self.my_request:
            text = "another client's reply is generating"
        self.query_one("#queue", Label).update(text)

    def update_memory_bar(self) -> None:
        self.query_one("#memory-bar", Static).update(memory_bar_text(self.history[-1] if self.history else None, self.model))

    # --- actions -------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        prompt = self.query_one(PromptInput)
        self.my_request = uuid.uuid4().hex
        body: dict[str, Any] = {"content": event.text}
        if self.current:
            body["conversation"] = self.current
        try:
            accepted = await self.client.request("chat", body, request_id=self.my_request)
        except (RequestFailed, asyncio.TimeoutError) as exc:
            self.notify(str(exc), severity="error")  # the text stays in the input
            return
        prompt.clear()
        if accepted["conversation"] != self.current:
            self.current = accepted["conversation"]
            await self.show_conversation()

    @on(ListView.Selected, "#conversations")
    async def switch_conversation(self, event: ListView.Selected) -> None:
        if event.item.name and event.item.name != self.current:
            self.current = event.item.name
            await self.show_conversation()

    async def action_new_conversation(self) -> None:
        self.current = None
        await self.show_conversation()
        self.query_one(PromptInput).focus()

    async def action_cancel(self) -> None:
        if self.my_request:
            try:
                await self.client.request("cancel", {"request": self.my_request})
            except RequestFailed:
                pass  # it already finished

    async def action_regenerate(self) -> None:
        if self.current:
            self.my_request = uuid.uuid4().hex
            try:
                await self.client.request("regenerate", {"conversation": self.current}, request_id=self.my_request)
            except RequestFailed as exc:
                self.notify(exc.message, severity="error")

    def action_dashboard(self) -> None:
        self.push_screen(DashboardScreen())


def run_app(runtime_dir: str | None) -> int:
    VramchatApp(runtime_dir).run()
    return 0
