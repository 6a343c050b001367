"""Small modals: confirm, rename, and a conversation's system prompt and sampling settings."""

from __future__ import annotations

from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, TextArea

from vramchat.shared.protocol import SAMPLING_FIELDS


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "answer(False)", "No"), Binding("y", "answer(True)", "Yes")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (Esc)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class TextDialog(ModalScreen[str | None]):
    """One line of text, e.g. a conversation's title."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, prompt: str, value: str) -> None:
        super().__init__()
        self.prompt, self.value = prompt, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.prompt)
            yield Input(self.value, id="text")
            yield Label("Enter saves, Esc cancels", classes="hint")

    @on(Input.Submitted)
    def save(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class SettingsDialog(ModalScreen[dict[str, Any] | None]):
    """A conversation's system prompt, sampling and context overflow; an empty field means the
    model's default, and the overflow policy is stored only once it is changed here.

    Returns the body of a `conversation.update` request, or None when cancelled.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+s", "save", "Save", priority=True),
    ]

    def __init__(self, conversation: dict[str, Any]) -> None:
        super().__init__()
        self.conversation = conversation
        # The daemon's default is drop_oldest (context_overflow in the config).
        self.dropping = (conversation.get("settings") or {}).get("context_overflow", "drop_oldest") == "drop_oldest"

    def compose(self) -> ComposeResult:
        settings = self.conversation.get("settings") or {}
        with Vertical(classes="dialog", id="settings-dialog"):
            yield Label(f"Settings of “{self.conversation['title']}”", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(self.conversation.get("system_prompt") or "", id="system-prompt")
            with Horizontal(classes="sampling"):
                for name in SAMPLING_FIELDS:
                    with Vertical(classes="sampling-field"):
                        yield Label(name)
                        yield Input(str(settings.get(name, "")), placeholder="default", id=f"s-{name}")
            yield Checkbox(
                "Past the context window, leave the oldest messages out", self.dropping, id="drop-oldest", compact=True
            )
            yield Label("", id="settings-error")
            yield Label("Ctrl+S saves, Esc cancels; an empty field keeps the model's default", classes="hint")

    def action_save(self) -> None:
        settings: dict[str, Any] = {}
        for name, kind in SAMPLING_FIELDS.items():
            text = self.query_one(f"#s-{name}", Input).value.strip()
            if not text:
                continue
            try:
                settings[name] = kind(text)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                self.query_one("#settings-error", Label).update(f"{name} must be {what}")
                return
        dropping = self.query_one("#drop-oldest", Checkbox).value
        if "context_overflow" in (self.conversation.get("settings") or {}) or dropping != self.dropping:
            settings["context_overflow"] = "drop_oldest" if dropping else "error"
        self.dismiss(
            {
                "id": self.conversation["id"],
                "system_prompt": self.query_one("#system-prompt", TextArea).text,
                "settings": settings,
            }
        )
