"""conversation.search (issue 24): full text over every message of every conversation, earlier
versions included, safe for any text. Real daemon, real SQLite FTS5."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vramchat.daemon.store_search import MAX_LINE_CHARS, fts_query, matching_line
from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.protocol import Event

from helpers import DaemonProcess, chat, collect_reply, wait_ready

SHORT = {"max_tokens": 2, "temperature": 0.0}
LONG_LINE = "word " * 60 + "the Kilimanjaro summit" + " word" * 60


async def ask(client: Client, events: AsyncIterator[Event], content: str, conversation: str | None = None) -> dict[str, Any]:
    """Ask and wait for the reply; the stored question."""
    request_id, accepted = await chat(client, content, SHORT, conversation)
    await asyncio.wait_for(collect_reply(events, request_id), 60)
    return dict(accepted["user_message"])


async def search(client: Client, text: str, **fields: Any) -> list[dict[str, Any]]:
    return list((await client.request("conversation.search", {"text": text, **fields}))["results"])


async def test_search_finds_every_version_in_every_conversation_newest_first(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        events = client.raw_events()
        await client.subscribe()
        replaced = await ask(client, events, "Plans for today:\nwe sail to Zanzibar at noon\nthen lunch")
        first = replaced["conversation_id"]
        request_id = uuid.uuid4().hex
        edit = {"conversation": first, "message": replaced["id"], "content": "we fly to Nairobi instead", "sampling": SHORT}
        edited = (await client.request("edit", edit, request_id=request_id))["user_message"]
        await asyncio.wait_for(collect_reply(events, request_id), 60)
        later = await ask(client, events, "Zanzibar spice farms, and Paris")
        quoted = await ask(client, events, 'say "hi" * AND NEAR( - ok', later["conversation_id"])
        long = await ask(client, events, f"intro\n{LONG_LINE}\noutro")

        # The word of the question the edit replaced: found, and said to be an earlier version.
        found = await search(client, "zanzibar")
        assert [r["message"] for r in found] == [later["id"], replaced["id"]]  # newest first, across conversations
        old = found[1]
        assert old == {
            "conversation": first,
            "title": old["title"],
            "message": replaced["id"],
            "role": "user",
            "line": "we sail to Zanzibar at noon",  # the line that matches, not the message's first
            "current": False,
            "created_at": replaced["created_at"],
        }
        assert old["title"] and found[0]["current"] is True and found[0]["conversation"] != first
        [new] = await search(client, "NAIROBI")
        assert new["message"] == edited["id"] and new["current"] is True
        # Switching to the earlier version makes it current.
        await client.request("conversation.switch", {"conversation": first, "message": replaced["id"]})
        assert [r["current"] for r in await search(client, "zanzibar sail")] == [True]
        # Prefixes, case and several words (all must match).
        assert [r["message"] for r in await search(client, "pari")] == [later["id"]]
        assert [r["message"] for r in await search(client, "zanz SPICE")] == [later["id"]]
        assert await search(client, "zanzibar nairobi") == []
        # FTS5 syntax in the text is text: no error, and it finds what it says.
        for text in [
            '"',
            "*",
            "AND",
            "NEAR(",
            "-",
            '"hi',
            "NEAR(zanzibar",
            "-zanzibar",
            "zanzibar OR",
            "a AND b",
            "x:y",
            "^sail",
            "((",
        ]:
            await search(client, text)
        assert [r["message"] for r in await search(client, "NEAR(")] == [quoted["id"]]
        assert [r["message"] for r in await search(client, '"hi" AND')] == [quoted["id"]]
        assert [r["message"] for r in await search(client, "-zanzibar*")] == [later["id"], replaced["id"]]
        assert await search(client, '" * -') == []  # no letter or digit: nothing to find
        # A long line comes back as the part around the match.
        [hit] = await search(client, "kilimanjaro")
        assert hit["message"] == long["id"] and "Kilimanjaro" in hit["line"] and len(hit["line"]) <= MAX_LINE_CHARS
        # limit: the newest ones.
        assert [r["message"] for r in await search(client, "zanzibar", limit=1)] == [later["id"]]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"text": ""}, "invalid_value"),
        ({"text": " \n\t"}, "invalid_value"),
        ({}, "bad_request"),
        ({"text": 5}, "bad_request"),
        ({"text": "x", "limit": 0}, "invalid_value"),
        ({"text": "x", "limit": 201}, "invalid_value"),
        ({"text": "x", "limit": -1}, "invalid_value"),
        ({"text": "x", "limit": "5"}, "bad_request"),
        ({"text": "x", "limit": True}, "bad_request"),
        ({"text": "x", "limit": 2.5}, "bad_request"),
    ],
)
async def test_bad_search_requests_say_why(tiny_daemon: DaemonProcess, body: dict[str, Any], code: str) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        with pytest.raises(RequestFailed) as failure:
            await client.request("conversation.search", body)
    assert failure.value.code == code and failure.value.message


def test_each_word_is_quoted_and_searched_as_a_prefix() -> None:
    assert fts_query('say "hi" NEAR( -x') == '"say"* """hi"""* "NEAR("* "-x"*'
    assert fts_query(' * - " _ ') is None


def test_the_matching_line_is_cut_around_the_match() -> None:
    assert matching_line("first\nsecond \ue000match\ue001 here\nthird") == "second match here"
    cut = matching_line("a" * 500 + " \ue000needle\ue001 " + "b" * 500)
    assert "needle" in cut and len(cut) <= MAX_LINE_CHARS
    assert matching_line("x" * 300 + "\ue000end\ue001").endswith("end")
