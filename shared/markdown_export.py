"""A conversation as a Markdown document, the one both `vramchat conversations ID --markdown` and
the TUI's "Export the chat as Markdown" write, and the reasoning/answer split of a reply.

The document: a `# title` header with the model(s) that replied and the date, an optional
`## System` section, then each message of the current version under `## User` or `## Assistant`
(with its status when it is not complete). A message's text goes in unchanged, so its code stays
fenced; a fence the message left open (a reply cancelled mid-block) is closed, so the next heading
is not swallowed. A reply's `<think>` part is kept, folded, in a `<details>` block whose body is
Markdown as well: it renders on GitHub, GitLab and in most Markdown viewers, and stays readable as
plain text.
"""

from __future__ import annotations

import re
import time
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROLE_HEADINGS = {"user": "User", "assistant": "Assistant", "system": "System"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
NAME_LENGTH = 60


def split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a stored reply. The block opens the reply (the engine stores its
    opening tag even where the chat template wrote it); a reply cut off while thinking has no end.
    None: no reasoning, and a `</think>` later in an answer is the answer's."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return None, content
    thinking, closed, answer = stripped.removeprefix(THINK_OPEN).partition(THINK_CLOSE)
    return thinking.strip("\n"), answer.lstrip("\n") if closed else ""


def close_fences(text: str) -> str:
    """`text` with a fenced code block it leaves open closed (CommonMark's fence rules)."""
    open_fence: str | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match is None:
            continue
        marks, rest = match.groups()
        if open_fence is None:
            if not (marks[0] == "`" and "`" in rest):  # a backtick fence's info has no backticks
                open_fence = marks
        elif marks[0] == open_fence[0] and len(marks) >= len(open_fence) and not rest.strip():
            open_fence = None
    return text if open_fence is None else f"{text.rstrip(chr(10))}\n{open_fence}"


def conversation_markdown(conversation: dict[str, Any], messages: list[dict[str, Any]]) -> str:
    """The Markdown document of `conversation` with `messages` (conversation.get's current branch)."""
    models = list(dict.fromkeys(m["model"] for m in messages if m["role"] == "assistant" and m.get("model")))
    created = conversation.get("created_at")
    lines = [f"# {conversation['title'] or 'Untitled chat'}", ""]
    lines.append(f"- Model: {', '.join(models) if models else 'none (no reply yet)'}")
    if created is not None:
        lines.append(f"- Date: {time.strftime('%Y-%m-%d %H:%M', time.localtime(created))}")
    lines += [f"- Conversation: {conversation['id']}", ""]
    if conversation.get("system_prompt"):
        lines += ["## System", "", close_fences(conversation["system_prompt"]), ""]
    for message in messages:
        lines += [message_heading(message), ""]
        content = message["content"] or ""
        reasoning, answer = split_reasoning(content) if message["role"] == "assistant" else (None, content)
        if reasoning is not None:
            lines += ["<details><summary>Reasoning</summary>", "", close_fences(reasoning), "", "</details>", ""]
        if answer:
            lines += [close_fences(answer.rstrip("\n")), ""]
    return "\n".join(lines)


def message_heading(message: dict[str, Any]) -> str:
    """`## User`, or `## Assistant (cancelled)` for a reply that did not complete."""
    role = ROLE_HEADINGS.get(message["role"], message["role"].capitalize())
    status = message.get("status") or "complete"
    return f"## {role}" if status == "complete" else f"## {role} ({status})"


def export_file_name(title: str) -> str:
    """A file name from a chat's title: safe on every file system, `.md`."""
    stem = UNSAFE_NAME.sub("-", title).strip("-.")[:NAME_LENGTH].rstrip("-.")
    return f"{stem or 'chat'}.md"
