"""The Textual app: the daemon follower, the key map and the actions; the chat pane and screens draw.

All state comes from the daemon through `Client.stream()`: a snapshot, then events. `ChatState`
applies them and says what changed, and only that is redrawn. After a gap or a daemon restart a
new snapshot replaces everything, so every attached app shows what the daemon stored. What the
user is typing is never touched by a resync.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq
from textual import on, work
from textual.app import ComposeResult, SystemCommand
from textual.containers import Horizontal
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen, Screen
from textual.widgets import Header, ListView
from textual.worker import Worker, WorkerState

from vramchat.shared import scheduling
from vramchat.shared.client import Client, DaemonNotRunning, RequestFailed, Snapshot
from vramchat.shared.text import title_from
from vramchat.tui import keys
from vramchat.tui.chat import SPARE_CORE, ChatView, frame_budget, usable_cpus
from vramchat.tui.dashboard import DashboardScreen
from vramchat.tui.dialogs import ConfirmDialog, SettingsDialog, TextDialog
from vramchat.tui.message_actions import ChatActions
from vramchat.tui.message_keys import ChatFooter
from vramchat.tui.models_screen import LoadDialog, ModelsScreen, machine
from vramchat.tui.state import Changes, ChatState, silence_limit
from vramchat.tui.telemetry_view import NO_GPU
from vramchat.tui.widgets import ConversationList, MemoryBar, PromptInput, StateChanged

# Actions that make sense on the dashboard and models screens too; the rest belong to the chat.
EVERYWHERE = {"dashboard", "models", "gpu_layers", "quit", "command_palette"}
NO_GPU_NOTICE_S = 10.0  # how long F7/F8's "no GPU here" stays up


class VramchatApp(ChatActions):
    """The TUI attached to the daemon that `client` talks to.

    The app always follows its client: it connects it when needed, applies its snapshots and
    events, and retries when the daemon goes away. `client` need not be connected yet. A test
    decides what the app sees by what it passes: a `Client` on a test daemon's runtime dir, or a
    stand-in `Client` subclass that serves a fixed snapshot (tests/tui_stub.py).
    """

    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute: subclasses live elsewhere
    TITLE = "vramchat"
    BINDINGS = keys.bindings()

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        client.token_pace_s = SPARE_CORE.token_pace_s  # until the daemon says what its engine runs
        self.cpus = usable_cpus()
        self.state = ChatState()
        self.connected = False
        self.last_event = 0.0
        self.no_gpu_said_at = float("-inf")
        self.keymap: dict[str, str] = {}
        self.sub_title = "connecting…"
        self.chat = ChatView(self.state, self.fetch_messages, self.painted)

    def compose(self) -> ComposeResult:
        yield Header()
        yield MemoryBar("memory: waiting for the daemon", classes="memory-bar")
        with Horizontal():
            yield ConversationList(id="conversations")
            yield self.chat
        yield ChatFooter(compact=True)

    def on_mount(self) -> None:
        self.keymap, problems = keys.load_keymap()
        self.set_keymap(self.keymap)
        for problem in problems:
            self.notify(problem, severity="warning", timeout=10)
        self.chat.prompt.focus()
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
            except (TimeoutError, DaemonNotRunning, RequestFailed, zmq.ZMQError, OSError) as exc:
                self.set_connected(False, str(exc))
                await self.client.close()
                await asyncio.sleep(1.0)

    def check_connection(self) -> None:
        """Silence for longer than the daemon's telemetry period allows means it is gone."""
        silent_for = asyncio.get_running_loop().time() - self.last_event
        if self.connected and silent_for > silence_limit(self.client.server):
            self.set_connected(False, "no events from vramchatd; waiting for it to come back")

    def set_connected(self, connected: bool, reason: str = "") -> None:
        if connected == self.connected and (connected or self.sub_title.startswith("disconnected")):
            return
        if not connected:
            self.notify(f"disconnected: {reason}", severity="warning")
        self.connected = connected
        self.show_connection(reason)

    def show_connection(self, reason: str = "") -> None:
        self.sub_title = (
            f"connected · {self.state.clients} client(s) attached" if self.connected else f"disconnected, retrying: {reason}"[:80]
        )

    async def apply_snapshot(self, body: dict[str, Any]) -> None:
        await self.redraw(self.state.apply_snapshot(body))

    async def apply_event(self, topic: str, body: dict[str, Any]) -> None:
        await self.redraw(self.state.apply_event(topic, body))

    async def redraw(self, changes: Changes) -> None:
        """Redraw what a snapshot or an event changed."""
        if changes.alarm is not None:
            severity: SeverityLevel = "error" if changes.alarm["severity"] == "critical" else "warning"
            self.notify(changes.alarm["message"], severity=severity, timeout=10)
        if changes.clients:
            self.show_connection()
        if changes.conversations:
            await self.query_one(ConversationList).show(self.state.conversations, self.state.current)
        focused = self.focused_message_id() if changes.log else None
        await self.chat.redraw(changes)
        if changes.log:
            self.restore_focus(focused)
        elif changes.message is not None:
            self.message_redrawn(changes.message)
        if changes.state:
            self.client.token_pace_s = frame_budget(self.state.model, self.cpus).token_pace_s
            self.state_changed()

    def state_changed(self) -> None:
        """Redraw the memory bar on every screen, and tell the other screens to redraw themselves."""
        sample = self.state.latest_sample()
        for screen in self.screen_stack:
            for bar in screen.query(MemoryBar):
                bar.show(sample, self.state.model, streaming=self.state.in_flight is not None)
            if screen is not self.screen_stack[0]:
                screen.post_message(StateChanged())

    async def fetch_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = (await self.client.request("conversation.get", {"id": conversation_id}))["messages"]
        return messages

    def painted(self, texts: dict[str, list[str]]) -> None:
        """Called after each frame's text is in the log; benchmarks/tui_lag.py times it."""

    # --- actions -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Chat actions only on the chat screen; none behind a dialog but quit and the palette."""
        if isinstance(self.screen, ModalScreen):
            return action in ("quit", "command_palette")
        if self.screen is not self.screen_stack[0] and action in {a.action.split("(")[0] for a in keys.ACTIONS}:
            return action in EVERYWHERE
        return True

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for action in keys.ACTIONS:
            if action.id != "quit":
                key = self.keymap.get(action.id, action.key)
                help_text = f"{key}: {action.description.lower()}" if key else action.hint
                yield SystemCommand(action.description, help_text, lambda a=action.action: self.run_action(a))

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
        if self.editing is not None:
            await self.send_edit(text)
            return
        if self.state.current is None:
            # Create the conversation first, so that its events are shown from the first one on;
            # titled from the first message, as the daemon titles the chats `ask` starts.
            created = await self.client.request("conversation.create", {"title": title_from(text)})
            self.state.current = created["conversation"]["id"]
            await self.chat.show_conversation()
        request_id = uuid.uuid4().hex
        self.state.my_requests.append(request_id)
        await self.client.request("chat", {"content": text, "conversation": self.state.current}, request_id=request_id)
        if self.chat.prompt.text == text:
            self.chat.prompt.clear()

    @on(ListView.Selected, "#conversations")
    async def switch_conversation(self, event: ListView.Selected) -> None:
        if event.item.name and event.item.name != self.state.current:
            if self.editing is not None:
                self.cancel_edit()
            self.state.current = event.item.name
            await self.chat.show_conversation()
        self.chat.prompt.focus()

    def action_focus_conversations(self) -> None:
        self.query_one(ConversationList).focus()

    async def action_new_conversation(self) -> None:
        if self.editing is not None:
            self.cancel_edit()
        self.state.current = None
        await self.chat.show_conversation()
        self.chat.prompt.focus()

    def action_rename_conversation(self) -> None:
        if not (conversation := self.state.current_conversation()):
            return

        def rename(title: str | None) -> None:
            if title:
                self.update_conversation({"id": conversation["id"], "title": title})

        self.push_screen(TextDialog("New title", conversation["title"]), rename)

    def action_conversation_settings(self) -> None:
        if not (conversation := self.state.current_conversation()):
            self.notify("start a chat first: settings belong to a conversation", severity="warning")
            return

        def save(body: dict[str, Any] | None) -> None:
            if body:
                self.update_conversation(body)

        self.push_screen(SettingsDialog(conversation), save)

    @work(group="requests", exit_on_error=False)
    async def update_conversation(self, body: dict[str, Any]) -> None:
        await self.client.request("conversation.update", body)

    def action_delete_conversation(self) -> None:
        if not (conversation := self.state.current_conversation()):
            return

        def delete(yes: bool | None) -> None:
            if yes:
                self.delete_conversation(conversation["id"])

        self.push_screen(ConfirmDialog(f"Delete “{conversation['title']}” and all its messages?"), delete)

    @work(group="requests", exit_on_error=False)
    async def delete_conversation(self, conversation_id: str) -> None:
        await self.client.request("conversation.delete", {"id": conversation_id})

    @work(group="requests", exit_on_error=False)
    async def action_cancel(self) -> None:
        """Cancel an edit; else the reply generating on screen, whoever asked for it; else this app's
        newest queued request."""
        if self.editing is not None:
            self.cancel_edit()
        elif target := self.state.cancel_target():
            try:
                await self.client.request("cancel", {"request": target})
            except RequestFailed as exc:
                if exc.code != "not_found":  # it had already finished
                    raise

    @work(group="requests", exit_on_error=False)
    async def action_regenerate(self) -> None:
        if self.state.current:
            request_id = uuid.uuid4().hex
            self.state.my_requests.append(request_id)
            await self.client.request("regenerate", {"conversation": self.state.current}, request_id=request_id)

    def action_dashboard(self) -> None:
        if not isinstance(self.screen, DashboardScreen):
            self.push_screen(DashboardScreen())

    def action_models(self) -> None:
        if not isinstance(self.screen, ModelsScreen):
            self.push_screen(ModelsScreen())

    def action_gpu_layers(self, delta: int) -> None:
        """Step n_gpu_layers from the loaded model's: the load dialog shows the prediction and asks first.

        Without a GPU there is nothing to step: say so, once while the notice is up, not per key press.
        """
        if not machine(self.state).has_gpu:
            now = asyncio.get_running_loop().time()
            if now - self.no_gpu_said_at > NO_GPU_NOTICE_S:
                self.no_gpu_said_at = now
                self.notify(NO_GPU, severity="warning", timeout=NO_GPU_NOTICE_S)
            return
        model = self.state.model
        if model.get("state") != "ready" or not isinstance(model.get("n_gpu_layers"), int):
            self.notify("no model is loaded: open the models screen (F3) to load one", severity="warning")
            return
        layers = max(0, model["n_gpu_layers"] + delta)
        if (total := (model.get("split") or {}).get("total_layers")) is not None:
            layers = min(layers, total)  # llama.cpp's count, the output layer included
        if layers == model["n_gpu_layers"]:
            least_or_most = "least" if delta < 0 else "most"
            self.notify(f"{layers} GPU layers is already the {least_or_most} this model takes", severity="warning")
            return
        title = f"Reload {model['name']} with {layers} GPU layers (now {model['n_gpu_layers']})?"
        self.push_screen(LoadDialog({"name": model["name"], "path": model["path"]}, layers, model.get("n_ctx") or 4096, title))


def run_app(runtime_dir: str | None) -> int:
    scheduling.use_short_slice()  # the app wakes for every frame of a reply's tokens
    VramchatApp(Client(runtime_dir, name="vramchat tui")).run()
    return 0
