"""Text rules the daemon and its clients share: a conversation's title from its first message."""

from __future__ import annotations

TITLE_LENGTH = 60


def title_from(content: str) -> str:
    """A conversation's title from its first message: the first line, at most 60 characters."""
    first_line = content.strip().splitlines()[0]
    return first_line[:TITLE_LENGTH] + ("…" if len(first_line) > TITLE_LENGTH else "")
