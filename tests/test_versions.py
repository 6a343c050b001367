"""Edit, regenerate and switch (issue 24): a conversation keeps every version of a turn, and the
current branch is what clients see and what the next prompt is built from. Real daemon, real
engine, real SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.protocol import Event

from helpers import DaemonProcess, chat, collect_reply, paused, wait_ready, wait_running

SHORT = {"max_tokens": 4, "temperature": 0.0}


async def turn(client: Client, events: AsyncIterator[Event], content: str, conversation: str | None = None) -> dict[str, Any]:
    """Ask, and return the finished reply."""
    request_id, _ = await chat(client, content, SHORT, conversation)
    _, final = await asyncio.wait_for(collect_reply(events, request_id), 60)
    assert final is not None and final["status"] == "complete", final
    return final


async def answered(
    client: Client, events: AsyncIterator[Event], kind: str, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send an `edit` or a `regenerate` and wait for its reply: the accepted body and the final reply."""
    request_id = uuid.uuid4().hex
    accepted = await client.request(kind, {**body, "sampling": SHORT}, request_id=request_id)
    _, final = await asyncio.wait_for(collect_reply(events, request_id), 60)
    assert final is not None and final["status"] == "complete", final
    return accepted, final


async def branch(client: Client, conversation: str) -> list[dict[str, Any]]:
    return list((await client.request("conversation.get", {"id": conversation}))["messages"])


def without_versions(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "versions"} for m in messages]


def stored_rows(daemon: DaemonProcess) -> list[tuple[str, str]]:
    """Every message row, read from the database itself: (id, content)."""
    with sqlite3.connect(daemon.data_dir / "conversations.sqlite3") as db:
        return sorted(db.execute("SELECT id, content FROM messages").fetchall())


async def switched_events(events: AsyncIterator[Event], conversation: str, count: int) -> list[dict[str, Any]]:
    """The next `count` `conversation` events with action `switched` for `conversation`."""
    seen: list[dict[str, Any]] = []
    async for event in events:
        if event.topic == "conversation" and event.body["action"] == "switched":
            assert event.body["conversation"]["id"] == conversation
            seen.append(event.body["conversation"])
            if len(seen) == count:
                return seen
    raise AssertionError("event stream ended")


async def test_an_edit_answers_the_new_question_and_keeps_the_old_branch_to_switch_to(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client, Client(tiny_daemon.runtime_dir) as watcher:
        await wait_ready(client)
        events, watched = client.raw_events(), watcher.raw_events()
        await client.subscribe()  # before the first chat: its reply may end before a later subscription
        await watcher.subscribe()
        first_reply = await turn(client, events, "What is the capital of France?")
        conversation = first_reply["conversation_id"]
        await turn(client, events, "And of Italy?", conversation)
        original = await branch(client, conversation)
        q1, a1, q2, a2 = (m["id"] for m in original)
        assert [m["parent_id"] for m in original] == [None, q1, a1, q2]
        assert all(m["versions"] == {"index": 1, "count": 1, "ids": [m["id"]]} for m in original)

        accepted, reply = await answered(
            client, events, "edit", {"conversation": conversation[:6], "message": q1, "content": "What is the capital of Spain?"}
        )
        edited = accepted["user_message"]
        assert accepted["conversation"] == conversation and accepted["position"] >= 1
        assert edited["parent_id"] is None and edited["content"] == "What is the capital of Spain?"
        assert reply["parent_id"] == edited["id"]  # the edited question is what was answered
        now = await branch(client, conversation)
        assert [m["id"] for m in now] == [edited["id"], reply["id"]]
        assert now[0]["versions"] == {"index": 2, "count": 2, "ids": [q1, edited["id"]]}
        assert now[1]["versions"] == {"index": 1, "count": 1, "ids": [reply["id"]]}
        conversation_now = (await client.request("conversation.get", {"id": conversation}))["conversation"]
        assert conversation_now["head"] == reply["id"]

        # A second client sees the edit move the head, then each switch.
        old = await client.request("conversation.switch", {"conversation": conversation, "message": q1})
        assert without_versions(old["messages"]) == without_versions(original)  # the old branch, whole
        assert old["messages"][0]["versions"] == {"index": 1, "count": 2, "ids": [q1, edited["id"]]}
        assert old["conversation"]["head"] == a2
        back = await client.request("conversation.switch", {"conversation": conversation, "message": edited["id"]})
        assert [m["id"] for m in back["messages"]] == [edited["id"], reply["id"]]
        heads = await asyncio.wait_for(switched_events(watched, conversation, 3), 30)
        assert [h["head"] for h in heads] == [edited["id"], a2, reply["id"]]

        # Regenerate: the earlier reply stays, as version 1 of 2.
        _, again = await answered(client, events, "regenerate", {"conversation": conversation})
        regenerated = await branch(client, conversation)
        assert [m["id"] for m in regenerated] == [edited["id"], again["id"]]
        assert regenerated[1]["versions"] == {"index": 2, "count": 2, "ids": [reply["id"], again["id"]]}
        # ... and a reply in the middle of an earlier branch, named by `message`.
        await client.request("conversation.switch", {"conversation": conversation, "message": a1})
        _, middle = await answered(client, events, "regenerate", {"conversation": conversation, "message": a1})
        assert middle["parent_id"] == q1
        assert [m["id"] for m in await branch(client, conversation)] == [q1, middle["id"]]
        whole = await client.request("conversation.switch", {"conversation": conversation, "message": q2})
        assert without_versions(whole["messages"]) == without_versions(original)

    # Nothing was deleted: the six messages of the two branches, and the three replies since.
    rows = stored_rows(tiny_daemon)
    kept = {m["id"]: m["content"] for m in original} | {edited["id"]: edited["content"]}
    kept |= {m["id"]: m["content"] for m in (reply, again, middle)}
    assert rows == sorted(kept.items())


async def test_versions_change_only_between_replies_and_bad_requests_say_why(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        engine_pid = (await wait_ready(client))["engine_pid"]
        events = client.raw_events()
        await client.subscribe()
        reply = await turn(client, events, "first question")
        conversation = reply["conversation_id"]
        question = (await branch(client, conversation))[0]["id"]
        other = await turn(client, events, "another conversation")

        async def refused(kind: str, body: dict[str, Any]) -> RequestFailed:
            with pytest.raises(RequestFailed) as failure:
                await client.request(kind, body)
            return failure.value

        # busy: a reply for this conversation is running (its engine paused: still running at the end).
        with paused(engine_pid):
            request_id, _ = await chat(client, "second question", SHORT, conversation)
            await wait_running(client, request_id)
            for kind, body in [
                ("edit", {"conversation": conversation, "message": question, "content": "changed"}),
                ("conversation.switch", {"conversation": conversation, "message": question}),
                ("regenerate", {"conversation": conversation}),
            ]:
                assert (await refused(kind, body)).code == "busy", kind
            # Another conversation is not held up.
            await client.request("conversation.switch", {"conversation": other["conversation_id"], "message": other["id"]})
        await asyncio.wait_for(collect_reply(events, request_id), 60)

        branch_now = await branch(client, conversation)
        assert [m["role"] for m in branch_now] == ["user", "assistant", "user", "assistant"]
        first_reply, second_question, second_reply = (m["id"] for m in branch_now[1:])
        await answered(client, events, "edit", {"conversation": conversation, "message": second_question, "content": "v2"})
        rows = stored_rows(tiny_daemon)

        edit = {"conversation": conversation, "message": question, "content": "changed"}
        for kind, body, code in [
            ("edit", {**edit, "content": " \n "}, "invalid_value"),
            ("edit", {**edit, "message": first_reply}, "invalid_value"),  # a reply: regenerate it
            ("edit", {**edit, "message": second_question}, "invalid_value"),  # an earlier version: switch first
            ("edit", {**edit, "sampling": {"temperature": 9}}, "invalid_value"),
            ("edit", {**edit, "message": "nope"}, "not_found"),
            ("edit", {**edit, "message": other["id"]}, "not_found"),  # another conversation's
            ("edit", {**edit, "conversation": "zzzzzz"}, "not_found"),
            ("edit", {**edit, "message": 7}, "bad_request"),
            ("edit", {"conversation": conversation, "message": question}, "bad_request"),  # no content
            ("regenerate", {"conversation": conversation, "message": question}, "invalid_value"),  # a question
            ("regenerate", {"conversation": conversation, "message": second_reply}, "invalid_value"),  # earlier version
            ("regenerate", {"conversation": conversation, "message": "nope"}, "not_found"),
            ("regenerate", {"conversation": conversation, "message": ["x"]}, "bad_request"),
            ("conversation.switch", {"conversation": conversation, "message": "nope"}, "not_found"),
            ("conversation.switch", {"conversation": conversation, "message": other["id"]}, "not_found"),
            ("conversation.switch", {"conversation": conversation}, "bad_request"),
        ]:
            failure = await refused(kind, body)
            assert failure.code == code and failure.message, (kind, body, failure)
        assert stored_rows(tiny_daemon) == rows  # a refused request stores nothing
        assert (await client.request("status"))["queue"] == {"running": None, "pending": []}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.demo
async def test_an_edit_of_the_last_question_reuses_the_kv_cache_up_to_it(demo_daemon: DaemonProcess, demo_model: Path) -> None:
    """The reply to an edit evaluates only the edited question and the generation prompt: the
    conversation before it is still in the engine's KV cache. Counted from the reply's stats
    against the prompt tokenized here with the engine's own template."""
    system = "You answer in one short sentence."
    sampling = {"max_tokens": 24, "temperature": 0.0}
    async with Client(demo_daemon.runtime_dir, timeout=120) as client:
        await wait_ready(client, timeout=60)
        events = client.raw_events()
        await client.subscribe()
        created = await client.request("conversation.create", {"title": "kv", "system_prompt": system})
        conversation = created["conversation"]["id"]
        for question in ("What is the capital of France?", "What river flows through it?", "How old is that city?"):
            request_id, _ = await chat(client, question, sampling, conversation)
            _, final = await asyncio.wait_for(collect_reply(events, request_id), 120)
            assert final is not None and final["status"] == "complete", final
        before = await branch(client, conversation)
        request_id = uuid.uuid4().hex
        edit = {
            "conversation": conversation,
            "message": before[-2]["id"],
            "content": "Name one museum there.",
            "sampling": sampling,
        }
        await client.request("edit", edit, request_id=request_id)
        _, reply = await asyncio.wait_for(collect_reply(events, request_id), 120)
        assert reply is not None and reply["status"] == "complete", reply
        after = await branch(client, conversation)

    from vramchat.daemon.llama.chat_model import ChatModel  # here: loading llama.cpp is for this test only

    model = ChatModel.load(str(demo_model), n_gpu_layers=0, n_ctx=512, n_threads=1)
    opening = [{"role": "system", "content": system}]
    old_prompt = model.prompt(opening + [{"role": m["role"], "content": m["content"]} for m in before[:-1]]).tokens
    new_prompt = model.prompt(opening + [{"role": m["role"], "content": m["content"]} for m in after[:-1]]).tokens
    shared = common_prefix(old_prompt, new_prompt)  # the conversation up to the edited question
    stats = reply["stats"]
    assert stats["prompt_tokens"] == len(new_prompt)  # the current branch only, not the old one
    assert stats["prompt_cached_tokens"] >= shared, (stats, shared)
    evaluated = stats["prompt_tokens"] - stats["prompt_cached_tokens"]
    assert evaluated <= len(new_prompt) - shared and evaluated * 4 < stats["prompt_tokens"], (stats, shared)
