"""A failing job fails alone (issue 23): a failure injected at each stage a request passes ends that
request with an error its client sees, and the next request is served by the same daemon.

The daemon runs through tests/fault_injection.py, which makes a request fail at a stage when its id
(or, over HTTP, its last message) starts with `fault-STAGE`; every other request runs untouched.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from http_daemon import HttpDaemon, start_http_daemon

from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.protocol import Event

from helpers import DaemonFactory, chat, collect_reply, wait_ready

FAULTY_DAEMON = [sys.executable, str(Path(__file__).with_name("fault_injection.py"))]
SHORT = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture
def faulty(daemon_factory: DaemonFactory, models_dir: Path) -> HttpDaemon:
    return start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"), command=FAULTY_DAEMON)


async def reply_to(client: Client, events: AsyncIterator[Event], request_id: str) -> dict[str, Any]:
    """The final message of the chat `request_id`, sent now."""
    await client.request("chat", {"content": "hello", "sampling": SHORT}, request_id=request_id)
    _, final = await asyncio.wait_for(collect_reply(events, request_id), 60)
    assert final is not None
    return final


async def served_next(client: Client, events: AsyncIterator[Event]) -> None:
    request_id, _ = await chat(client, "and now?", SHORT)
    _, final = await asyncio.wait_for(collect_reply(events, request_id), 60)
    assert final is not None and final["status"] == "complete", final


@pytest.mark.parametrize("stage", ["queue", "worker", "channel", "relay"])
async def test_a_failure_after_the_request_was_taken_in_ends_it_alone(faulty: HttpDaemon, stage: str) -> None:
    async with Client(faulty.daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()
        final = await reply_to(client, events, f"fault-{stage}-{uuid.uuid4().hex}")
        # The engine channel cannot be trusted after a failure there: the engine is stopped, the
        # reply is interrupted and the model reloads, as after an engine crash.
        assert final["status"] == ("interrupted" if stage == "channel" else "error"), final
        assert final["error"], "the reply says what went wrong"
        await served_next(client, events)
        tasks = (await client.request("status"))["daemon"]["tasks"]
    if stage == "worker":
        assert tasks["generation"]["restarts"] == 1 and "InjectedFault" in tasks["generation"]["last_error"], tasks
    else:
        assert all(task["restarts"] == 0 for task in tasks.values()), tasks
    assert "injected" in faulty.daemon.log().lower() or stage == "channel"


async def test_a_failure_while_a_chat_is_taken_in_gets_an_error_reply(faulty: HttpDaemon) -> None:
    async with Client(faulty.daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()
        with pytest.raises(RequestFailed) as error:
            await client.request("chat", {"content": "hello"}, request_id=f"fault-intake-{uuid.uuid4().hex}")
        assert error.value.code == "internal" and "see its log" in error.value.message
        await served_next(client, events)


async def test_a_failure_in_the_http_layer_gets_a_json_error_and_the_next_request_is_served(faulty: HttpDaemon) -> None:
    async with Client(faulty.daemon.runtime_dir) as client:
        await wait_ready(client)

    def completion(content: str) -> tuple[int, dict[str, Any]]:
        body = {"model": "any", "max_tokens": 5, "messages": [{"role": "user", "content": content}]}
        return faulty.post("/v1/chat/completions", json.dumps(body).encode())

    status, body = await asyncio.to_thread(completion, "fault-intake over HTTP")
    assert status == 500 and body["error"]["code"] == "internal", body
    status, body = await asyncio.to_thread(completion, "hello")
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
