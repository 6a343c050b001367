"""What the app does with the messages of the chat on screen: copy a reply or its code (OSC 52,
so it reaches the local clipboard over SSH), edit a question, regenerate a reply, switch versions,
search every chat and export one as Markdown.

`ChatActions` is the app's base: the command palette's entries and the focused message's keys
(tui/message_keys.py) call these methods. Versions are the daemon's: an edit or a regenerate
makes a sibling of the message and switches to it, and every attached app redraws on the
`conversation` event with action `switched`.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt
from textual import work
from textual.app import App

from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.markdown_export import conversation_markdown, export_file_name, split_reasoning
from vramchat.tui.chat import ChatView
from vramchat.tui.search_screen import SearchScreen
from vramchat.tui.state import ChatState
from vramchat.tui.widgets import ChatMessage, ConversationList

EDITING_TITLE = "editing your message; Esc cancels the edit"


def code_blocks(content: str) -> list[str]:
    """The code of a reply's fenced blocks, without the fences (nor the newline before the closing
    one); those of its reasoning are left out, as the chat folds it."""
    _, answer = split_reasoning(content)
    return [token.content.removesuffix("\n") for token in MarkdownIt("commonmark").parse(answer) if token.type == "fence"]


def write_new_file(directory: Path, name: str, text: str) -> Path:
    """Write `text` to `name` in `directory`, or to name-2, name-3… when it exists: never over a file."""
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in itertools.count(1):
        path = directory / (name if n == 1 else f"{stem}-{n}{suffix}")
        try:
            with path.open("x", encoding="utf-8") as file:
                file.write(text)
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def lines(count: int) -> str:
    return "1 line" if count == 1 else f"{count} lines"


class ChatActions(App[None]):
    """The message actions of VramchatApp, which sets `client`, `state` and `chat`."""

    client: Client
    state: ChatState
    chat: ChatView

    def __init__(self) -> None:
        super().__init__()
        self.editing: dict[str, Any] | None = None  # the question being edited in the prompt
        self.draft = ""  # what the prompt held before the edit, back on Esc
        self.focus_after_redraw: str | None = None  # a message id to focus once the log shows it

    # --- the messages -------------------------------------------------------------------------

    def shown_messages(self) -> list[dict[str, Any]]:
        return [widget.message for widget in self.chat.query(ChatMessage)]

    async def stored_messages(self) -> list[dict[str, Any]]:
        """The current version of the chat on screen, as the daemon stored it."""
        if self.state.current is None:
            return []
        messages: list[dict[str, Any]] = (await self.client.request("conversation.get", {"id": self.state.current}))["messages"]
        return messages

    def focused_message_id(self) -> str | None:
        return self.focused.message["id"] if isinstance(self.focused, ChatMessage) else None

    def restore_focus(self, previous: str | None) -> None:
        """After the log was drawn again: focus the message asked for, else the one focused before."""
        target = self.focus_after_redraw or previous
        widget = self.chat.message_widget(target) if target else None
        if widget is None:
            return
        if target == self.focus_after_redraw:
            self.focus_after_redraw = None
        # Now, not after the next refresh as Widget.focus does: a redraw meanwhile would remove the
        # widget, and the focus would stay on it, out of the screen, where no key reaches the app.
        widget.screen.set_focus(widget)
        widget.scroll_visible(animate=False)

    def message_redrawn(self, message: dict[str, Any]) -> None:
        """A message of the chat on screen was stored or finished. `msg` events do not say which
        version a message is, so a finished reply (a regenerated one has a sibling) asks."""
        if message["status"] in ("generating", "deleted"):
            return
        widget = self.chat.message_widget(message["id"])
        if "versions" in message and widget is not None:
            widget.show_versions(message["versions"])
        elif message["role"] == "assistant":
            self.refresh_versions()

    @work(group="versions", exclusive=True, exit_on_error=False)
    async def refresh_versions(self) -> None:
        try:
            messages = await self.stored_messages()
        except RequestFailed:  # the chat was deleted meanwhile: nothing to show
            return
        for message in messages:
            if (widget := self.chat.message_widget(message["id"])) is not None:
                widget.show_versions(message.get("versions"))

    def action_focus_messages(self) -> None:
        """From the prompt into the log: the last message takes the focus."""
        widgets = self.chat.query(ChatMessage)
        if not widgets:  # a new chat: the prompt keeps the focus
            return
        widgets.last().screen.set_focus(widgets.last())
        widgets.last().scroll_visible(animate=False)

    # --- copy ---------------------------------------------------------------------------------

    @work(group="requests", exit_on_error=False)
    async def action_copy_last_reply(self) -> None:
        reply = next((m for m in reversed(await self.stored_messages()) if m["role"] == "assistant"), None)
        if reply is None:
            self.notify("this chat has no reply to copy yet", severity="warning")
            return
        self.copy_message(reply)

    @work(group="requests", exit_on_error=False)
    async def action_copy_last_code_block(self) -> None:
        reply = next((m for m in reversed(await self.stored_messages()) if m["role"] == "assistant"), None)
        if reply is None:
            self.notify("this chat has no reply yet, so no code block to copy", severity="warning")
            return
        self.copy_code_block(reply, -1)

    def copy_message(self, message: dict[str, Any]) -> None:
        """A message's text as stored (a reply with its reasoning), through OSC 52."""
        content = message["content"] or ""
        self.copy_to_clipboard(content)
        who = "your message" if message["role"] == "user" else "the reply"
        self.notify(f"copied {who} ({lines(len(content.splitlines()))}, {len(content)} characters)", timeout=4)

    def copy_code_block(self, message: dict[str, Any], index: int) -> None:
        """Block `index` (negative: from the last, round and round) of the message's fenced code."""
        blocks = code_blocks(message["content"] or "")
        if not blocks:
            self.notify("no fenced code block in this message: nothing was copied", severity="warning")
            return
        number = index % len(blocks)
        self.copy_to_clipboard(blocks[number])
        which = "the last code block" if number == len(blocks) - 1 else f"code block {number + 1}"
        self.notify(f"copied {which} of {len(blocks)} ({lines(len(blocks[number].splitlines()))}), without the fences", timeout=4)

    # --- edit and regenerate ------------------------------------------------------------------

    def action_edit_last_message(self) -> None:
        question = next((m for m in reversed(self.shown_messages()) if m["role"] == "user"), None)
        if question is None:
            self.notify("nothing to edit: this chat has no message of yours yet", severity="warning")
            return
        self.edit_message(question)

    def edit_message(self, message: dict[str, Any]) -> None:
        """Put a question in the prompt; sending it makes a new version from there (`edit`)."""
        if message["role"] != "user":
            self.notify("only your own messages can be edited; r regenerates a reply", severity="warning")
            return
        prompt = self.chat.prompt
        if self.editing is None:
            self.draft = prompt.text
        self.editing = message
        prompt.text = message["content"] or ""
        prompt.move_cursor(prompt.document.end)
        prompt.border_title = EDITING_TITLE
        prompt.add_class("editing")
        prompt.focus()

    def cancel_edit(self) -> None:
        self.end_edit()
        self.chat.prompt.text = self.draft
        self.chat.prompt.move_cursor(self.chat.prompt.document.end)

    def end_edit(self) -> None:
        self.editing = None
        self.chat.prompt.border_title = None
        self.chat.prompt.remove_class("editing")

    async def send_edit(self, text: str) -> None:
        """The edited question replaces its turn, and what followed it, in the chat's current version."""
        assert self.editing is not None and self.state.current is not None
        request_id = uuid.uuid4().hex
        self.state.my_requests.append(request_id)
        body = {"conversation": self.state.current, "message": self.editing["id"], "content": text}
        await self.client.request("edit", body, request_id=request_id)
        self.end_edit()
        if self.chat.prompt.text == text:
            self.chat.prompt.clear()

    @work(group="requests", exit_on_error=False)
    async def regenerate_message(self, message: dict[str, Any]) -> None:
        """A new version of this reply, beside it; the old one stays stored."""
        if message["role"] != "assistant" or self.state.current is None:
            return
        request_id = uuid.uuid4().hex
        self.state.my_requests.append(request_id)
        await self.client.request(
            "regenerate", {"conversation": self.state.current, "message": message["id"]}, request_id=request_id
        )

    def switch_version(self, message: dict[str, Any], step: int) -> None:
        versions = message.get("versions") or {}
        ids, index = versions.get("ids") or [message["id"]], (versions.get("index") or 1) - 1 + step
        if len(ids) < 2:
            self.notify("this message has only one version", timeout=3)
        elif not 0 <= index < len(ids):
            self.notify(f"this is already the {'oldest' if step < 0 else 'newest'} version", timeout=3)
        else:
            self.switch_to(ids[index])

    @work(group="requests", exit_on_error=False)
    async def switch_to(self, message_id: str) -> None:
        """Make current the version through `message_id`; the `switched` event redraws every app."""
        await self.switch_and_focus(self.state.current, message_id)

    async def switch_and_focus(self, conversation: str | None, message_id: str) -> None:
        """`conversation.switch`, with the focus on `message_id` once the log shows it. The
        `switched` event that redraws the log may come before the reply."""
        self.focus_after_redraw = message_id
        try:
            await self.client.request("conversation.switch", {"conversation": conversation, "message": message_id})
        except RequestFailed:  # busy: the chat stays as it is
            self.focus_after_redraw = None
            raise

    # --- search and export --------------------------------------------------------------------

    def action_search(self) -> None:
        def chosen(result: dict[str, Any] | None) -> None:
            if result is not None:
                self.open_search_result(result)

        self.push_screen(SearchScreen(self.client), chosen)

    @work(group="requests", exit_on_error=False)
    async def open_search_result(self, result: dict[str, Any]) -> None:
        """Open the result's chat at its message, switching to the version that holds it."""
        if self.editing is not None:
            self.end_edit()
        self.state.current = result["conversation"]
        if not result["current"]:
            try:
                await self.switch_and_focus(result["conversation"], result["message"])
                return  # its `switched` event redraws the log, and focuses the message
            except RequestFailed:
                await self.chat.show_conversation()  # the chat as it is, and why not the version
                raise
        self.focus_after_redraw = result["message"]
        await self.query_one(ConversationList).show(self.state.conversations, self.state.current)
        await self.chat.show_conversation()
        self.restore_focus(None)

    @work(group="requests", exit_on_error=False)
    async def action_export_markdown(self) -> None:
        """The chat's current version as Markdown, in a new file in the current directory."""
        if self.state.current is None:
            self.notify("start a chat first: there is nothing to export", severity="warning")
            return
        data = await self.client.request("conversation.get", {"id": self.state.current})
        text = conversation_markdown(data["conversation"], data["messages"])
        path = write_new_file(Path.cwd(), export_file_name(data["conversation"]["title"]), text)
        self.notify(f"exported to {path}", timeout=10)
