"""A chat as Markdown (shared/markdown_export.py) and `vramchat conversations` --markdown and
--search: the export renders back (markdown-it, CommonMark) to the blocks of the original
messages; search finds the words of a question that an edit replaced (real daemon)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from vramchat.shared.client import Client
from vramchat.shared.markdown_export import close_fences, conversation_markdown, export_file_name, split_reasoning
from vramchat.shared.protocol import Event
from vramchat.tui import cli

from helpers import DaemonProcess, chat, collect_reply, wait_ready

CONVERSATION = {"id": "0123456789ab", "title": "Reversing lists", "created_at": 1_700_000_000.0, "system_prompt": ""}
CODE = "def reverse(items):\n    return items[::-1]\n\n\nprint(reverse([1, 2, 3]))\n"
MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "status": "complete", "model": None, "content": "How do I reverse a list?\n\n## Not a role heading"},
    {
        "role": "assistant",
        "status": "complete",
        "model": "Qwen3-0.6B-Q8_0.gguf",
        "content": f"<think>\nThe user wants *slicing*.\n</think>\n\nUse slicing:\n\n```python title=x\n{CODE}```\n\nDone.",
    },
    {"role": "user", "status": "complete", "model": None, "content": "And with tildes?"},
    {
        "role": "assistant",
        "status": "cancelled",
        "model": "Qwen3-0.6B-Q8_0.gguf",
        "content": "Like this:\n\n~~~~sh\necho cut off",
    },
]


def fences(text: str) -> list[tuple[str, str]]:
    return [(t.info, t.content) for t in MarkdownIt("commonmark").parse(text) if t.type == "fence"]


ROLE_HEADING = re.compile(r"(User|Assistant)( \(\w+\))?")


def sections(document: str) -> list[tuple[str, str]]:
    """(heading, source text) for each role heading of the document, from markdown-it's line map."""
    lines = document.split("\n")
    tokens: list[Token] = MarkdownIt("commonmark").parse(document)
    headings = [
        (i, t)
        for i, t in enumerate(tokens)
        if t.type == "heading_open" and t.tag == "h2" and t.level == 0 and ROLE_HEADING.fullmatch(tokens[i + 1].content)
    ]
    found = []
    for n, (i, token) in enumerate(headings):
        assert token.map is not None
        end = headings[n + 1][1].map[0] if n + 1 < len(headings) else len(lines)  # type: ignore[index]
        found.append((tokens[i + 1].content, "\n".join(lines[token.map[1] : end]).strip("\n")))
    return found


def test_the_export_renders_back_to_the_same_blocks_and_texts() -> None:
    document = conversation_markdown(CONVERSATION, MESSAGES)
    assert document.startswith("# Reversing lists\n\n- Model: Qwen3-0.6B-Q8_0.gguf\n- Date: ")
    # The fences come back with the same info string and code, the cancelled reply's one closed.
    assert fences(document) == [("python title=x", CODE), ("sh", "echo cut off\n")]
    # Each message is under its role's heading; a heading of its own stays inside it.
    found = sections(document)
    assert [heading for heading, _ in found] == ["User", "Assistant", "User", "Assistant (cancelled)"]
    assert found[0][1] == MESSAGES[0]["content"] and found[2][1] == MESSAGES[2]["content"]
    reasoning, answer = split_reasoning(MESSAGES[1]["content"])
    assert found[1][1] == f"<details><summary>Reasoning</summary>\n\n{reasoning}\n\n</details>\n\n{answer}"
    assert found[3][1] == MESSAGES[3]["content"] + "\n~~~~"
    html = MarkdownIt("commonmark").render(document)
    assert "<details><summary>Reasoning</summary>" in html and "<em>slicing</em>" in html  # the reasoning renders, folded


@pytest.mark.parametrize(
    ("content", "split"),
    [
        ("<think>a\nb</think>\n\nanswer", ("a\nb", "answer")),
        ("a </think> in an answer", (None, "a </think> in an answer")),
        ("<think>cut off while thinking", ("cut off while thinking", "")),
        ("no reasoning at all", (None, "no reasoning at all")),
    ],
)
def test_split_reasoning(content: str, split: tuple[str | None, str]) -> None:
    assert split_reasoning(content) == split


def test_close_fences_closes_only_an_open_fence() -> None:
    assert close_fences("```py\nx = 1\n```") == "```py\nx = 1\n```"
    assert close_fences("````\n```\nstill code") == "````\n```\nstill code\n````"
    assert close_fences("``` not`a fence\ntext") == "``` not`a fence\ntext"


def test_export_file_names_are_safe() -> None:
    assert export_file_name("Why is the sky blue? / part 2") == "Why-is-the-sky-blue-part-2.md"
    assert export_file_name("../../etc/passwd") == "etc-passwd.md"
    assert export_file_name("…") == "chat.md"


# --- the CLI, against a real daemon ----------------------------------------------------------------

SHORT = {"max_tokens": 4, "temperature": 0.0}


async def answer(events: AsyncIterator[Event], request_id: str) -> None:
    _, final = await asyncio.wait_for(collect_reply(events, request_id), 60)
    assert final is not None and final["status"] == "complete", final


async def edited_conversation(daemon: DaemonProcess) -> str:
    """A conversation whose question about walruses was edited into one about penguins."""
    async with Client(daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()  # before the first request: no event of its reply is missed
        events = client.raw_events()
        request_id, accepted = await chat(client, "Tell me about the walrus colony", SHORT)
        await answer(events, request_id)
        conversation: str = accepted["conversation"]
        question = (await client.request("conversation.get", {"id": conversation}))["messages"][0]
        request_id = uuid.uuid4().hex
        body = {"conversation": conversation, "message": question["id"], "content": "Tell me about penguins", "sampling": SHORT}
        await client.request("edit", body, request_id=request_id)
        await answer(events, request_id)
    return conversation


def vramchat(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert cli.main(["--runtime-dir", str(daemon.runtime_dir), "conversations", *args]) == 0
    return capsys.readouterr().out


def test_search_finds_a_word_an_edit_replaced(tiny_daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    conversation = asyncio.run(edited_conversation(tiny_daemon))
    out = vramchat(tiny_daemon, capsys, "--search", "walrus")
    assert out.splitlines()[:2] == [
        f"{conversation}  Tell me about the walrus colony  user  [earlier version]",
        "    Tell me about the walrus colony",
    ]
    results = json.loads(vramchat(tiny_daemon, capsys, "--search", "pengu", "--json"))["results"]
    assert [(r["conversation"], r["role"], r["current"]) for r in results] == [(conversation, "user", True)]
    assert vramchat(tiny_daemon, capsys, "--search", "narwhal") == "nothing found\n"


def test_markdown_export_prints_the_current_version(tiny_daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    conversation = asyncio.run(edited_conversation(tiny_daemon))
    out = vramchat(tiny_daemon, capsys, conversation, "--markdown")

    async def stored() -> dict[str, Any]:
        async with Client(tiny_daemon.runtime_dir) as client:
            return await client.request("conversation.get", {"id": conversation})

    data = asyncio.run(stored())
    assert out == conversation_markdown(data["conversation"], data["messages"])
    assert "## User\n\nTell me about penguins\n\n## Assistant\n\n" in out and "walrus" not in out.split("- Conversation:")[1]
    assert "tiny.gguf" in out.splitlines()[2]  # the model that replied


def test_markdown_needs_one_conversation(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["conversations", "--markdown"]) == 2
    assert "give its ID" in capsys.readouterr().err
