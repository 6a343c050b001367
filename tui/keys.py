"""Key bindings, overridable from the `[keys]` table of the config file.

Each action has a binding id; the config maps ids to Textual key names, e.g.

    [keys]
    dashboard = "f2"
    gpu_layers_down = "f7,ctrl+down"

Textual's keymap (`App.set_keymap`) applies them, so the footer and the command palette show the
keys the user chose. An unknown id or a value that is not a string is reported, not fatal.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding, BindingType

from vramchat.shared import paths


@dataclass(frozen=True)
class Action:
    id: str
    key: str
    action: str
    description: str  # in the command palette
    label: str = ""  # in the footer, short enough for all of them to fit in 80 columns; none: not shown
    hint: str = ""  # for an action without a key (in the command palette only): its help line there

    @property
    def show(self) -> bool:
        return bool(self.label)


ACTIONS: tuple[Action, ...] = (
    Action("cancel", "escape", "cancel", "Cancel the reply generating", "Cancel"),
    Action("regenerate", "ctrl+r", "regenerate", "Regenerate the last reply", "Regen"),
    Action("new_conversation", "ctrl+n", "new_conversation", "New chat", "New"),
    Action("dashboard", "f2", "dashboard", "Memory dashboard", "Dash"),
    Action("models", "f3", "models", "Models", "Models"),
    Action("rename_conversation", "f4", "rename_conversation", "Rename chat"),
    Action("conversation_settings", "f5", "conversation_settings", "Chat settings: system prompt and sampling"),
    Action("delete_conversation", "f6", "delete_conversation", "Delete chat"),
    Action("gpu_layers_down", "f7", "gpu_layers(-1)", "One GPU layer fewer (reload)", "GPU-"),
    Action("gpu_layers_up", "f8", "gpu_layers(1)", "One GPU layer more (reload)", "GPU+"),
    Action("focus_conversations", "ctrl+l", "focus_conversations", "Chat list"),
    Action("focus_messages", "ctrl+up", "focus_messages", "Go to the messages (then up/down, Esc back to the prompt)"),
    Action("search", "ctrl+f", "search", "Search every chat"),
    # In the palette only; a focused message has keys for the same (tui/message_keys.py).
    Action("copy_last_reply", "", "copy_last_reply", "Copy the last reply", hint="as stored; c copies a focused message"),
    Action(
        "copy_last_code_block",
        "",
        "copy_last_code_block",
        "Copy the last code block",
        hint="of the last reply, without the fences; y on a focused reply cycles its blocks",
    ),
    Action("edit_last_message", "", "edit_last_message", "Edit the last message", hint="Enter sends it, Esc cancels"),
    Action("export_markdown", "", "export_markdown", "Export the chat as Markdown", hint="to a new file in this directory"),
    Action("quit", "ctrl+q", "quit", "Quit", "Quit"),
)


def bindings() -> list[BindingType]:
    """Priority bindings: the prompt's TextArea has the focus and binds many Ctrl keys itself."""
    return [
        Binding(a.key, a.action, a.label or a.description, show=a.show, priority=a.id != "cancel", id=a.id)
        for a in ACTIONS
        if a.key
    ]


def load_keymap(config: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """The `[keys]` overrides from the config file, and a message for each entry that was ignored."""
    path = config or paths.config_path()
    try:
        raw = tomllib.loads(path.read_text()).get("keys", {})
    except FileNotFoundError:
        return {}, []
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return {}, [f"key bindings not read from {path}: {exc}"]
    if not isinstance(raw, dict):
        return {}, [f'[keys] in {path} must be a table of action = "key"']
    known = {a.id for a in ACTIONS if a.key}
    keymap, problems = {}, []
    for action, key in raw.items():
        if action not in known:
            problems.append(f"[keys] {action}: no such action; known: {', '.join(sorted(known))}")
        elif not isinstance(key, str) or not key.strip():
            problems.append(f'[keys] {action}: the key must be a string such as "f2" or "ctrl+x"')
        else:
            keymap[action] = key.strip()
    return keymap, problems
