"""The Textual app: chat with streaming Markdown, an always-visible memory bar, a dashboard, models.

All state comes from the daemon through `Client.stream()`: a snapshot, then events. After a gap
or a daemon restart a new snapshot replaces everything, so every attached app shows what the
daemon stored. What the user is typing is never touched by a resync.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path
from typing import Any, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Label, ListItem, ListView, Static
from textual.worker import Worker, WorkerState
import zmq

from vramchat.shared.client import Client, DaemonNotRunning, RequestFailed, Snapshot
from vramchat.tui import keys
from vramchat.tui.dashboard import DashboardScreen
from vramchat.tui.dialogs import ConfirmDialog, SettingsDialog, TextDialog
from vramchat.tui.models import LoadDialog, ModelsScreen
from vramchat.tui.widgets import ChatMessage, MemoryBar, PromptInput, StateChanged

# Without an event for this long (telemetry comes every 0.5 s) the daemon is taken to be gone.
SILENCE_S = 3.0
HISTORY_KEPT = 1200
# Streamed text reaches the screen at most this often. A small model on a GPU makes hundreds of
# tokens a second; drawing each one would put the screen further behind with every token.
FRAME_S = 1 / 30
# Actions that make sense on the dashboard and models screens too; the rest belong to the chat.
EVERYWHERE = {"dashboard", "models", "gpu_layers", "quit", "command_palette"}


class VramchatApp(App[None]):
    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute: subclasses live elsewhere
    TITLE = "vramchat"
    BINDINGS = keys.bindings()

    def __init__(self, runtime_dir: str | None = None, *, follow: bool = True) -> None:
        """`follow=False` leaves the daemon alone: the tests feed state to the widgets themselves."""
        super().__init__()
        self.client = Client(runtime_dir, name="vramchat tui")
        self.follow = follow
        self.conversations: list[dict[str, Any]] = []
        self.current: str | None = None
        self.model: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.alarms: list[dict[str, Any]] = []
        # The reply generating now: {"message", "conversation", "parts"}, its text so far in pieces.
        self.in_flight: dict[str, Any] | None = None
        # Tokens received for the conversation on screen and not drawn yet, per message id.
        self.unpainted: dict[str, list[str]] = {}
        self.paint_wanted = asyncio.Event()
        # This app's recent chat and regenerate requests, newest last; the daemon's queue names requests.
        self.my_requests: collections.deque[str] = collections.deque(maxlen=64)
        self.queue: dict[str, Any] = {"running": None, "pending": []}
        self.connected = False
        self.clients = 0
        self.last_event = 0.0
        self.drawing = asyncio.Lock()  # one writer at a time in the message log
        self.keymap: dict[str, str] = {}
        self.sub_title = "connecting…"

    def compose(self) -> ComposeResult:
        yield Header()
        yield MemoryBar("memory: waiting for the daemon", classes="memory-bar")
        with Horizontal():
            yield ListView(id="conversations")
            with Vertical(id="chat"):
                yield VerticalScroll(id="log")
                yield Label("", id="queue")
                yield PromptInput(id="prompt")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.keymap, problems = keys.load_keymap()
        self.set_keymap(self.keymap)
        for problem in problems:
            self.notify(problem, severity="warning", timeout=10)
        self.query_one("#log", VerticalScroll).anchor()  # follow new text until the user scrolls up
        self.query_one(PromptInput).focus()
        self.run_worker(self.paint_tokens(), group="paint", exit_on_error=False)
        if self.follow:
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
                    # A queued event is received without suspending: yield, or a fast reply
                    # starves key presses and repaints until the backlog is drained.
                    await asyncio.sleep(0)
            except (DaemonNotRunning, RequestFailed, asyncio.TimeoutError, zmq.ZMQError, OSError) as exc:
                self.set_connected(False, str(exc))
                await self.client.close()
                await asyncio.sleep(1.0)

    def check_connection(self) -> None:
        if self.connected and asyncio.get_running_loop().time() - self.last_event > SILENCE_S:
            self.set_connected(False, "no events from vramchatd; waiting for it to come back")

    def set_connected(self, connected: bool, reason: str = "") -> None:
        if connected == self.connected and (connected or self.sub_title.startswith("disconnected")):
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
        self.history = list((body.get("telemetry") or {}).get("history") or [])[-HISTORY_KEPT:]
        self.alarms = list(body.get("alarms") or [])
        self.conversations = body["conversations"]
        self.clients = body["clients"]
        flight = body["in_flight"]
        self.in_flight = flight and {"message": flight["message"], "conversation": flight["conversation"], "parts": [flight["text"]]}
        self.show_connection()
        if self.current not in {c["id"] for c in self.conversations}:
            self.current = self.conversations[0]["id"] if self.conversations else None
        await self.show_conversation_list()
        await self.show_conversation(resync=True)
        self.show_queue(body["queue"])
        self.state_changed()

    async def apply_event(self, topic: str, body: dict[str, Any]) -> None:
        if topic == "telemetry":
            self.history.append(body)
            del self.history[:-HISTORY_KEPT]
            self.state_changed()
        elif topic == "model":
            self.model = body
            self.state_changed()
        elif topic == "clients":
            self.clients = body["count"]
            self.show_connection()
        elif topic == "alarm":
            self.alarms = [a for a in self.alarms if a["kind"] != body["kind"]] + ([body] if body["active"] else [])
            if body["active"]:
                self.notify(body["message"], severity="error" if body["severity"] == "critical" else "warning", timeout=10)
            self.state_changed()
        elif topic == "conversation":
            await self.on_conversation_event(body)
        elif topic == "msg":
            await self.on_message_event(body)
        elif topic == "tok":
            await self.on_token(body)
        elif topic == "queue":
            self.show_queue(body)

    def state_changed(self) -> None:
        """Redraw the memory bar on every screen, and tell the other screens to redraw themselves."""
        sample = self.history[-1] if self.history else None
        for screen in self.screen_stack:
            for bar in screen.query(MemoryBar):
                bar.show(sample, self.model)
            if screen is not self.screen_stack[0]:
                screen.post_message(StateChanged())

    async def on_conversation_event(self, body: dict[str, Any]) -> None:
        conversation = body["conversation"]
        self.conversations = [c for c in self.conversations if c["id"] != conversation["id"]]
        if body["action"] != "deleted":
            self.conversations.insert(0, conversation)
        elif conversation["id"] == self.current:
            self.current = self.conversations[0]["id"] if self.conversations else None
            await self.show_conversation()
        await self.show_conversation_list()

    async def on_message_event(self, message: dict[str, Any]) -> None:
        if message["status"] == "generating":
            self.in_flight = {"message": message["id"], "conversation": message["conversation_id"], "parts": [message["content"] or ""]}
        elif self.in_flight and self.in_flight["message"] == message["id"]:
            self.in_flight = None
        if message["conversation_id"] != self.current:
            return
        async with self.drawing:
            widget = self.message_widget(message["id"])
            if message["status"] == "deleted":
                if widget is not None:
                    await widget.remove()
            elif widget is None:
                await self.query_one("#log", VerticalScroll).mount(ChatMessage(message))
            elif message["status"] != "generating":
                self.unpainted.pop(message["id"], None)  # the stored text replaces them
                await widget.finish(message)

    async def on_token(self, body: dict[str, Any]) -> None:
        """Only collect the text here: `paint_tokens` draws it, a frame at a time."""
        if self.in_flight and self.in_flight["message"] == body["message"]:
            self.in_flight["parts"].append(body["text"])
        if body["conversation"] == self.current:
            self.unpainted.setdefault(body["message"], []).append(body["text"])
            self.paint_wanted.set()

    async def paint_tokens(self) -> None:
        """Draw what arrived since the last frame, in one Markdown append per message, forever."""
        while True:
            await self.paint_wanted.wait()
            self.paint_wanted.clear()
            async with self.drawing:
                pending, self.unpainted = self.unpainted, {}
                for message_id, parts in pending.items():
                    widget = self.message_widget(message_id)
                    if widget is not None:
                        await widget.append("".join(parts))
            self.painted(pending)
            await asyncio.sleep(FRAME_S)

    def painted(self, texts: dict[str, list[str]]) -> None:
        """Called after each frame's text is in the log; benchmarks/tui_lag.py times it."""

    def message_widget(self, message_id: str) -> ChatMessage | None:
        for widget in self.query(ChatMessage):
            if widget.message["id"] == message_id:
                return widget
        return None

    async def fetch_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        return (await self.client.request("conversation.get", {"id": conversation_id}))["messages"]

    # --- drawing -------------------------------------------------------------------------------

    async def show_conversation_list(self) -> None:
        listing = self.query_one("#conversations", ListView)
        await listing.clear()
        await listing.extend(ListItem(Label(c["title"][:60]), name=c["id"]) for c in self.conversations)
        ids = [c["id"] for c in self.conversations]
        if self.current in ids:
            listing.index = ids.index(self.current)

    async def show_conversation(self, resync: bool = False) -> None:
        """Redraw the log from the store, with the text generated so far for a reply in flight.

        On a resync, a user reading older messages keeps their place; otherwise the log follows the end."""
        log = self.query_one("#log", VerticalScroll)
        reading_at = log.scroll_y if resync and log.scroll_y < log.max_scroll_y else None
        async with self.drawing:
            await log.remove_children()
            if self.current is None:
                await log.mount(Static("Type a message below and press Enter (Ctrl+J: new line). "
                                       "Ctrl+P lists every command.", classes="hint"))
                return
            try:
                messages = await self.fetch_messages(self.current)
            except RequestFailed:
                return
            flight = self.in_flight
            self.unpainted.clear()  # the text so far is drawn whole below
            messages = [{**m, "content": "".join(flight["parts"])} if flight and m["id"] == flight["message"] else m for m in messages]
            await log.mount_all([ChatMessage(m) for m in messages])
            if reading_at is None:
                log.anchor()
            else:
                log.release_anchor()
                self.call_after_refresh(log.scroll_to, y=reading_at, animate=False, immediate=True)

    def show_queue(self, queue: dict[str, Any]) -> None:
        self.queue = queue
        mine = next((job for job in queue["pending"] if job["request"] in self.my_requests), None)
        running = queue["running"]
        running_is_mine = running is not None and running["request"] in self.my_requests
        text = ""
        if mine:
            ahead = mine["position"] - 1 + (1 if running else 0)
            text = f"queued: {ahead} request(s) ahead of yours"
            if running:
                text += ", including your reply that is generating" if running_is_mine else ", another client's reply is generating"
        elif running and not running_is_mine:
            text = "another client's reply is generating"
        label = self.query_one("#queue", Label)
        label.update(text)
        label.display = bool(text)

    # --- actions -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Chat actions only on the chat screen; none behind a dialog but quit and the palette."""
        if isinstance(self.screen, ModalScreen):
            return action in ("quit", "command_palette")
        if self.screen is not self.screen_stack[0] and action in {a.action.split("(")[0] for a in keys.ACTIONS}:
            return action in EVERYWHERE
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for action in keys.ACTIONS:
            if action.id != "quit":
                key = self.keymap.get(action.id, action.key)
                yield SystemCommand(action.description, f"{key}: {action.description.lower()}",
                                    lambda a=action.action: self.run_action(a))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place where a failed worker is reported: a request that went wrong, a dead socket."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            error = event.worker.error
            message = error.message if isinstance(error, RequestFailed) else str(error) or type(error).__name__
            self.notify(message, severity="error", timeout=8)

    @on(PromptInput.Submitted)
    def on_submit(self, event: PromptInput.Submitted) -> None:
        if not self.connected:
            self.notify("not connected to vramchatd; your text is kept, send it again when it is back", severity="warning")
            return
        self.send(event.text)

    @work(group="send", exclusive=True, exit_on_error=False)
    async def send(self, text: str) -> None:
        prompt = self.query_one(PromptInput)
        if self.current is None:
            # Create the conversation first, so that its events are shown from the first one on.
            self.current = (await self.client.request("conversation.create", {}))["conversation"]["id"]
            await self.show_conversation()
        request_id = uuid.uuid4().hex
        self.my_requests.append(request_id)
        await self.client.request("chat", {"content": text, "conversation": self.current}, request_id=request_id)
        if prompt.text == text:
            prompt.clear()

    @on(ListView.Selected, "#conversations")
    async def switch_conversation(self, event: ListView.Selected) -> None:
        if event.item.name and event.item.name != self.current:
            self.current = event.item.name
            await self.show_conversation()
        self.query_one(PromptInput).focus()

    def action_focus_conversations(self) -> None:
        self.query_one("#conversations", ListView).focus()

    async def action_new_conversation(self) -> None:
        self.current = None
        await self.show_conversation()
        self.query_one(PromptInput).focus()

    def current_conversation(self) -> dict[str, Any] | None:
        return next((c for c in self.conversations if c["id"] == self.current), None)

    def action_rename_conversation(self) -> None:
        if conversation := self.current_conversation():
            self.push_screen(TextDialog("New title", conversation["title"]),
                             lambda title: title and self.update_conversation({"id": conversation["id"], "title": title}))

    def action_conversation_settings(self) -> None:
        if conversation := self.current_conversation():
            self.push_screen(SettingsDialog(conversation), lambda body: body and self.update_conversation(body))
        else:
            self.notify("start a chat first: settings belong to a conversation", severity="warning")

    @work(group="requests", exit_on_error=False)
    async def update_conversation(self, body: dict[str, Any]) -> None:
        await self.client.request("conversation.update", body)

    def action_delete_conversation(self) -> None:
        if conversation := self.current_conversation():
            self.push_screen(ConfirmDialog(f"Delete “{conversation['title']}” and all its messages?"),
                             lambda yes: yes and self.delete_conversation(conversation["id"]))

    @work(group="requests", exit_on_error=False)
    async def delete_conversation(self, conversation_id: str) -> None:
        await self.client.request("conversation.delete", {"id": conversation_id})

    @work(group="requests", exit_on_error=False)
    async def action_cancel(self) -> None:
        """Cancel the reply generating on screen, whoever asked for it; else this app's newest queued request."""
        running = self.queue["running"]
        if running and running["conversation"] == self.current:
            target = running["request"]
        else:
            queued = [job["request"] for job in self.queue["pending"] if job["request"] in self.my_requests]
            # A request just sent may not be in the daemon's queue events yet.
            known = {job["request"] for job in self.queue["pending"]} | ({running["request"]} if running else set())
            latest = self.my_requests[-1] if self.my_requests else None
            target = queued[-1] if queued else (latest if latest not in known else None)
        if target:
            try:
                await self.client.request("cancel", {"request": target})
            except RequestFailed as exc:
                if exc.code != "not_found":  # it had already finished
                    raise

    @work(group="requests", exit_on_error=False)
    async def action_regenerate(self) -> None:
        if self.current:
            request_id = uuid.uuid4().hex
            self.my_requests.append(request_id)
            await self.client.request("regenerate", {"conversation": self.current}, request_id=request_id)

    def action_dashboard(self) -> None:
        if not isinstance(self.screen, DashboardScreen):
            self.push_screen(DashboardScreen())

    def action_models(self) -> None:
        if not isinstance(self.screen, ModelsScreen):
            self.push_screen(ModelsScreen())

    def action_gpu_layers(self, delta: int) -> None:
        """Step n_gpu_layers from the loaded model's: the load dialog shows the prediction and asks first."""
        model = self.model
        if model.get("state") != "ready" or not isinstance(model.get("n_gpu_layers"), int):
            self.notify("no model is loaded: open the models screen (F3) to load one", severity="warning")
            return
        layers = max(0, model["n_gpu_layers"] + delta)
        if (total := (model.get("split") or {}).get("total_layers")) is not None:
            layers = min(layers, total)  # llama.cpp's count, the output layer included
        if layers == model["n_gpu_layers"]:
            self.notify(f"{layers} GPU layers is already the {'least' if delta < 0 else 'most'} this model takes", severity="warning")
            return
        title = f"Reload {model['name']} with {layers} GPU layers (now {model['n_gpu_layers']})?"
        self.push_screen(LoadDialog({"name": model["name"], "path": model["path"]}, layers, model.get("n_ctx") or 4096, title))


def run_app(runtime_dir: str | None) -> int:
    VramchatApp(runtime_dir).run()
    return 0
