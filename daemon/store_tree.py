"""Messages as a tree: the current branch of a conversation, and the versions at each message.

An edit or a regenerate adds a sibling of a message (same parent, same role) and moves the
conversation's head there; what was there stays stored as an earlier version. These functions
read the messages of one conversation, in the order they were stored, and never write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def branch(messages: Sequence[dict[str, Any]], head: str | None) -> list[dict[str, Any]]:
    """The messages from the first one down to `head`, in order, each with its `versions`:
    `{"index": 1-based, "count", "ids": sibling ids, oldest first}`."""
    by_id = {m["id"]: m for m in messages}
    path: list[dict[str, Any]] = []
    cursor = by_id.get(head) if head else None
    while cursor is not None and len(path) <= len(messages):  # the bound stops a damaged cycle
        path.append(cursor)
        cursor = by_id.get(cursor["parent_id"]) if cursor["parent_id"] else None
    path.reverse()
    siblings: dict[tuple[str | None, str], list[str]] = {}
    for m in messages:
        siblings.setdefault((m["parent_id"], m["role"]), []).append(m["id"])
    return [_with_versions(m, siblings[(m["parent_id"], m["role"])]) for m in path]


def _with_versions(message: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    return {**message, "versions": {"index": ids.index(message["id"]) + 1, "count": len(ids), "ids": ids}}


def newest_leaf(messages: Sequence[dict[str, Any]], top: str) -> str:
    """The newest message at or below `top`: a child is always stored after its parent, so the
    newest one below has no children: it is the end of the branch last added to under `top`."""
    below = {top}
    newest = top
    for m in messages:  # in the order stored: a parent comes before its children
        if m["parent_id"] in below:
            below.add(m["id"])
            newest = m["id"]
    return newest
