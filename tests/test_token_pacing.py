"""The TUI's client reads `tok` events in batches (`token_pace_s`), with a `msg` doorbell (issue 24, item 6)."""

from __future__ import annotations

from typing import Any

from vramchat.shared.client import Client, Snapshot

from helpers import chat, wait_ready


async def test_a_paced_client_gets_every_event_in_order_and_its_doorbell_is_no_second_client(tiny_daemon: Any) -> None:
    client = Client(tiny_daemon.runtime_dir, timeout=30)
    client.token_pace_s = 0.1
    async with client:
        await wait_ready(client)
        conversation = (await client.request("conversation.create", {}))["conversation"]["id"]
        stream = client.stream()
        first = await anext(stream)
        assert isinstance(first, Snapshot) and client.doorbell is not None
        request_id, _ = await chat(client, "hello", {"temperature": 0.0, "max_tokens": 300, "seed": 1}, conversation)
        texts: list[str] = []
        expected_index = 0
        async for item in stream:
            assert not isinstance(item, Snapshot), "a gap or a restart: events were lost or reordered"
            if item.topic == "tok" and item.body["request"] == request_id:
                assert item.body["index"] == expected_index
                expected_index += item.body["count"]
                texts.append(item.body["text"])
            elif item.topic == "msg" and item.body.get("request") == request_id and item.body["status"] != "generating":
                final = item.body
                break
        assert "".join(texts) == final["content"] and expected_index > 0
        assert (await client.request("snapshot"))["clients"] == 1
