"""A reply's reasoning block: `<think>…</think>` at its start (DeepSeek-R1 distills, Qwen3).

The daemon stores a reply whole, the block included; the TUI shows the block apart from the
answer, and the daemon counts the tokens and seconds the model spent in it (reply stats
`thinking`). Text that does not open with the block has none: a `</think>` later in an answer
is the answer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPEN = "<think>"
CLOSE = "</think>"


@dataclass(frozen=True)
class Parts:
    """A reply split at its reasoning block."""

    thinking: str | None  # the block's text without its tags; None: the reply has no block
    answer: str  # what follows the block (everything, without one)
    closed: bool  # the block's end has come (always, without one)


def split(text: str) -> Parts:
    """Split `text`, which may still be growing: an open block holds all of it so far."""
    body = text.lstrip()
    if not body.startswith(OPEN):
        # A reply may be cut after a part of the tag: show nothing of it until it is known.
        if body and OPEN.startswith(body):
            return Parts("", "", False)
        return Parts(None, text, True)
    inside = body[len(OPEN) :]
    end = inside.find(CLOSE)
    if end < 0:
        partial = next((n for n in range(len(CLOSE) - 1, 0, -1) if inside.endswith(CLOSE[:n])), 0)
        return Parts(inside[: len(inside) - partial].strip("\n"), "", False)
    return Parts(inside[:end].strip("\n"), inside[end + len(CLOSE) :].lstrip("\n"), True)


def summary(tokens: int, seconds: float) -> str:
    """The folded block's one line."""
    return f"thought for {tokens} token{'' if tokens == 1 else 's'}, {seconds:.1f} s"


class ThinkingClock:
    """Follows a reply as its frames come and notes when its reasoning block ends: the tokens
    generated up to the frame that closes it, and the seconds from the first token to that frame's
    last (the engine's stamps)."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens = 0
        self.first_stamp: float | None = None
        self.stats: dict[str, Any] | None = None  # {"tokens", "seconds"} once the block has ended
        self.following = True  # until the reply shows it has no block, or the block has ended

    def add(self, text: str, stamps: list[float]) -> None:
        """One frame: its text and the engine's time of each of its tokens."""
        if not self.following:
            return
        self.tokens += len(stamps)
        if self.first_stamp is None and stamps:
            self.first_stamp = stamps[0]
        self.text += text
        parts = split(self.text)
        if parts.thinking is None:
            self.following = False
        elif parts.closed:
            self.following = False
            last = stamps[-1] if stamps else self.first_stamp or 0.0
            self.stats = {"tokens": self.tokens, "seconds": round(max(0.0, last - (self.first_stamp or last)), 3)}
