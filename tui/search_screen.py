"""Search every chat: the daemon's full-text search (`conversation.search`, earlier versions of
messages included), as you type; choosing a result opens its chat at that message."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList

from vramchat.shared.client import Client, RequestFailed

SEARCH_LIMIT = 50


def result_text(result: dict[str, Any]) -> Text:
    """Two lines: the chat's title, who wrote it and whether it is an earlier version; then the matching line."""
    earlier = " · earlier version" if not result["current"] else ""
    return Text.assemble((result["title"] or "Untitled chat", "bold"), f" · {result['role']}{earlier}\n  {result['line']}")


class SearchScreen(ModalScreen[dict[str, Any] | None]):
    """Returns the chosen result (`conversation.search`'s), or None when closed."""

    # ↓ from the text goes to the results (the result list binds ↓ itself once it has the focus).
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("down", "pick", "Results", show=False),
    ]

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.results: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="search-dialog"):
            yield Label("Search every chat, earlier versions of messages included", classes="dialog-title")
            yield Input(placeholder="words to find (a word finds the words it starts)", id="search-text")
            yield Label("", id="search-status")
            yield OptionList(id="search-results")
            yield Label("Enter or ↓ picks a result and opens its chat; Esc closes", classes="hint")

    @property
    def result_list(self) -> OptionList:
        return self.query_one("#search-results", OptionList)

    @on(Input.Changed, "#search-text")
    def text_changed(self, event: Input.Changed) -> None:
        self.search(event.value)

    @work(exclusive=True, group="search", exit_on_error=False)
    async def search(self, text: str) -> None:
        status = self.query_one("#search-status", Label)
        if not text.strip():
            self.results = []
            self.result_list.clear_options()
            status.update("")
            return
        try:
            reply = await self.client.request("conversation.search", {"text": text, "limit": SEARCH_LIMIT})
        except RequestFailed as exc:
            status.update(exc.message)
            return
        self.results = reply["results"]
        self.result_list.clear_options()
        self.result_list.add_options(result_text(result) for result in self.results)
        found = len(self.results)
        status.update(
            f"{found} message(s) found" + (" (the newest shown)" if found >= SEARCH_LIMIT else "") if found else "nothing found"
        )

    @on(Input.Submitted, "#search-text")
    def action_pick(self) -> None:
        if self.results:
            self.result_list.focus()
            self.result_list.highlighted = 0

    @on(OptionList.OptionSelected, "#search-results")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.results[event.option_index])
