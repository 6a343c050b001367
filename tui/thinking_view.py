"""A reply's reasoning block on screen: open while the model thinks, then folded into one line."""

from __future__ import annotations

from typing import Any

from textual.widgets import Collapsible, Markdown

from vramchat.shared import thinking

THINKING_TITLE = "thinking…"


async def grow(markdown: Markdown, shown: str, text: str) -> None:
    """Show `text` in `markdown`, which shows `shown`: append what extends it (Markdown.append
    re-parses only from the last block on), else draw it afresh."""
    if text.startswith(shown):
        if rest := text[len(shown) :]:
            await markdown.append(rest)
    else:
        await markdown.update(text)


class ThinkingFold(Collapsible):
    """The reasoning block of one reply. It streams open; when the block ends it folds once into
    "thought for N tokens, X s" (the app's own count while streaming, the daemon's stats after).
    Its title expands it again: a click, or Enter on it (and the `t` key on a focused message)."""

    def __init__(self, text: str, closed: bool, stats: dict[str, Any] | None) -> None:
        """`closed`: the block has ended, or the reply has (a reply stopped while it thought)."""
        self.markdown = Markdown(text)
        self.shown = text
        self.closed = closed
        super().__init__(self.markdown, title=self.heading(closed, stats), collapsed=closed, classes="thinking")

    @staticmethod
    def heading(closed: bool, stats: dict[str, Any] | None) -> str:
        if not closed:
            return f"{THINKING_TITLE} {stats['tokens']} tokens" if stats else THINKING_TITLE
        return thinking.summary(int(stats["tokens"]), float(stats["seconds"])) if stats else "thought"

    def _watch_collapsed(self, collapsed: bool) -> None:
        """As Collapsible's, but without scrolling the fold into view: when it folds itself, the
        log keeps following the answer streaming below it."""
        self._update_collapsed(collapsed)
        self.post_message(self.Collapsed(self) if collapsed else self.Expanded(self))

    async def show(self, text: str, closed: bool, stats: dict[str, Any] | None) -> None:
        """The block as it stands: its text, whether it has ended, and its tokens and seconds so
        far (the title keeps the last ones it was given). It folds when it ends, once: a reader
        who opens it again keeps it open."""
        await grow(self.markdown, self.shown, text)
        self.shown = text
        ended, self.closed = closed and not self.closed, closed
        if stats or ended:
            self.title = self.heading(closed, stats)
        if ended:
            self.collapsed = True
