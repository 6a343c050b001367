"""What a focused message does with a key: move to the next one, copy it or its code, edit or
regenerate it, switch its version, fold its reasoning. ChatMessage inherits this; the work that
needs the daemon is the app's (tui/message_actions.py).

The footer shows only the keys that apply to the focused message: edit for a question,
regenerate and reasoning for a reply, versions where there are several; and of the app's, only
Quit and the palette, so that it fits in 80 columns (the app's keys still work).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Collapsible, Footer, Label
from textual.widgets._footer import FooterKey

if TYPE_CHECKING:
    from vramchat.tui.app import VramchatApp


def version_text(message: dict[str, Any]) -> str:
    """ "1/2" between angle quotes for a message with other versions; empty for one with a single version."""
    versions = message.get("versions") or {}
    count = versions.get("count") or 1
    return f"\u2039 {versions.get('index', 1)}/{count} \u203a" if count > 1 else ""


class MessageKeys(Vertical):
    """A message that can take the focus, and its keys."""

    can_focus = True
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "step(-1)", "Previous message", show=False),
        Binding("down,j", "step(1)", "Next message", show=False),
        Binding("escape", "leave", "Prompt"),
        Binding("c", "copy", "Copy"),
        Binding("y", "copy_code", "Code"),
        Binding("e", "edit", "Edit"),
        Binding("r", "regenerate", "Regen"),
        Binding("left,[", "version(-1)", "Older"),
        Binding("right,]", "version(1)", "Newer"),
        Binding("t", "reasoning", "Think"),
    ]
    # The message dict as the daemon sent it; ChatMessage sets it.
    message: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.code_presses = 0  # "y" presses so far: each one copies the block before the last copied

    def on_mount(self) -> None:
        if text := version_text(self.message):
            self.mount(Label(text, classes="versions"))

    def show_versions(self, versions: dict[str, Any] | None) -> None:
        """The message's versions changed (a regenerated reply learns it has a sibling once stored)."""
        self.message = {**self.message, "versions": versions}
        text = version_text(self.message)
        labels = self.query(".versions").results(Label)
        if label := next(labels, None):
            label.update(text)
            label.display = bool(text)
        elif text:
            self.mount(Label(text, classes="versions"))
        self.refresh_bindings()

    @property
    def vramchat(self) -> VramchatApp:
        return cast("VramchatApp", self.app)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        role = self.message["role"]
        if action == "edit":
            return role == "user"
        if action in ("regenerate", "reasoning"):
            return role == "assistant"
        if action == "version":
            return ((self.message.get("versions") or {}).get("count") or 1) > 1
        return True

    def action_step(self, step: int) -> None:
        """Focus the message before or after this one; past the last one, the prompt."""
        siblings = [w for w in self.parent.children if isinstance(w, MessageKeys)] if self.parent else [self]
        index = siblings.index(self) + step
        if index >= len(siblings):
            self.vramchat.chat.prompt.focus()
        elif index >= 0:
            self.screen.set_focus(siblings[index])  # now: see ChatActions.restore_focus
            siblings[index].scroll_visible(animate=False)

    def action_leave(self) -> None:
        self.vramchat.chat.prompt.focus()

    def action_copy(self) -> None:
        self.vramchat.copy_message(self.message)

    def action_copy_code(self) -> None:
        """The last fenced block first; pressed again, the one before it, round and round."""
        self.code_presses += 1
        self.vramchat.copy_code_block(self.message, -self.code_presses)

    def action_edit(self) -> None:
        self.vramchat.edit_message(self.message)

    def action_regenerate(self) -> None:
        self.vramchat.regenerate_message(self.message)

    def action_version(self, step: int) -> None:
        self.vramchat.switch_version(self.message, step)

    def action_reasoning(self) -> None:
        """Fold or unfold the reasoning (the `Collapsible.thinking` blocks of a reply)."""
        folds = list(self.query(Collapsible).filter(".thinking"))
        if not folds:
            self.notify("this reply has no reasoning to fold", timeout=3)
        for fold in folds:
            fold.collapsed = not fold.collapsed


# The keys a message binds: in the footer while it has the focus.
MESSAGE_KEYS = {key for binding in MessageKeys.BINDINGS if isinstance(binding, Binding) for key in binding.key.split(",")}


class ChatFooter(Footer):
    """The footer; while a message has the focus, its keys in place of the app's."""

    def compose(self) -> ComposeResult:
        widgets = list(super().compose())
        focused = self.screen.focused
        # A message's own keys apply inside it too (the title of its reasoning fold has the focus).
        if focused is not None and any(isinstance(node, MessageKeys) for node in focused.ancestors_with_self):
            widgets = [w for w in widgets if not isinstance(w, FooterKey) or self.message_key(w)]
            self.styles.grid_size_columns = sum(1 for w in widgets if not w.has_class("-command-palette"))
        yield from widgets

    @staticmethod
    def message_key(key: FooterKey) -> bool:
        return key.key in MESSAGE_KEYS or key.action == "quit" or key.has_class("-command-palette")
