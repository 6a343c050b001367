"""Full-text search over every stored message (SQLite FTS5), earlier versions included.

A person types words, not FTS5 syntax: each word is quoted, so `"`, `*`, `AND`, `NEAR(` or `-`
are searched for as text and never make a syntax error, and each word matches as a prefix
("pari" finds "Paris"). The index folds case and diacritics (unicode61 remove_diacritics 2).
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

MAX_LINE_CHARS = 200
# Marks FTS5's highlight() puts around each match, to find the line that matches; private-use
# characters that a message is not expected to hold.
MATCH_START, MATCH_END = "\ue000", "\ue001"
_SEARCHABLE = re.compile(r"[^\W_]")  # a letter or digit: what unicode61 keeps as a token


def fts_query(text: str) -> str | None:
    """The FTS5 query for `text`: every word, quoted, as a prefix; None when no word has a letter
    or digit (nothing can match)."""
    words = [word for word in text.split() if _SEARCHABLE.search(word)]
    if not words:
        return None
    return " ".join('"' + word.replace('"', '""') + '"*' for word in words)


def search(db: sqlite3.Connection, text: str, limit: int) -> list[dict[str, Any]]:
    """Messages matching `text`, newest first: where each is (`conversation`, `title`, `message`,
    `role`, `created_at`) and its matching `line`; `current` is filled in by the caller."""
    query = fts_query(text)
    if query is None:
        return []
    # The newest matches first, then the marked text of those only: highlight() tokenizes a
    # message again, which costs far more than the match when a common word matches thousands.
    newest = [
        seq
        for (seq,) in db.execute(
            "SELECT m.seq FROM messages_fts JOIN messages AS m ON m.seq = messages_fts.rowid "
            "WHERE messages_fts MATCH ? ORDER BY m.created_at DESC, m.seq DESC LIMIT ?",
            (query, limit),
        )
    ]
    if not newest:
        return []
    rows = db.execute(
        "SELECT m.seq, m.id, m.conversation_id, m.role, m.created_at, c.title, "
        "highlight(messages_fts, 0, ?, ?) AS marked "
        "FROM messages_fts JOIN messages AS m ON m.seq = messages_fts.rowid "
        "JOIN conversations AS c ON c.id = m.conversation_id "
        f"WHERE messages_fts MATCH ? AND messages_fts.rowid IN ({', '.join('?' * len(newest))})",
        (MATCH_START, MATCH_END, query, *newest),
    ).fetchall()
    rows.sort(key=lambda row: newest.index(row["seq"]))
    return [
        {
            "conversation": row["conversation_id"],
            "title": row["title"],
            "message": row["id"],
            "role": row["role"],
            "line": matching_line(row["marked"]),
            "created_at": row["created_at"],
        }
        for row in rows
    ]


def matching_line(marked: str) -> str:
    """The line holding the first match in `marked` (text with the match marks), at most
    MAX_LINE_CHARS around that match, without the marks."""
    start = marked.find(MATCH_START)
    if start < 0:
        start = 0
    line_start = marked.rfind("\n", 0, start) + 1
    line_end = marked.find("\n", start)
    line = marked[line_start : line_end if line_end >= 0 else len(marked)]
    match_at = len(line[: start - line_start].replace(MATCH_START, "").replace(MATCH_END, ""))
    line = line.replace(MATCH_START, "").replace(MATCH_END, "")
    if len(line) <= MAX_LINE_CHARS:
        return line.strip()
    begin = max(0, min(match_at - MAX_LINE_CHARS // 4, len(line) - MAX_LINE_CHARS))
    return line[begin : begin + MAX_LINE_CHARS].strip()
