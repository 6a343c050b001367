"""A stand-in for the daemon's client, for TUI tests that must not depend on a daemon or the clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import EllipsisType
from typing import Any

from vramchat.shared.client import Client, RequestFailed, Snapshot
from vramchat.shared.protocol import Event


class StubClient(Client):
    """Serves one snapshot body, then only the events a test puts in `events`, and the messages in
    `messages` for `conversation.get`. Its daemon publishes telemetry hourly (per its `hello`), so
    the app never takes it for gone while a test looks at the screen. Other requests are recorded
    in `requests` and answered with their body in `replies` (e.g. `models`), else an empty one."""

    def __init__(
        self,
        snapshot: dict[str, Any],
        messages: dict[str, list[dict[str, Any]]] | None = None,
        replies: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__("/nonexistent", name="vramchat tui test")
        self.snapshot = snapshot
        self.messages = messages or {}
        self.replies = replies or {}
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        # What the daemon does on a request before it replies, e.g. publish an event, per type.
        self.before_reply: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {}

    async def connect(self) -> dict[str, Any]:
        self.server = {"telemetry_interval_s": 3600.0}
        return self.server

    async def stream(self) -> AsyncIterator[Snapshot | Event]:
        yield Snapshot(epoch=self.snapshot["epoch"], seq=self.snapshot["seq"], body=self.snapshot)
        while True:
            yield await self.events.get()

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.events.put_nowait(Event(topic=topic, epoch=self.snapshot["epoch"], seq=0, body=body))

    async def request(
        self,
        type_: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | EllipsisType | None = ...,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        if type_ == "conversation.get":
            conversation = (body or {})["id"]
            if conversation not in self.messages:
                raise RequestFailed("not_found", f"no conversation {conversation}")
            known = {c["id"]: c for c in self.snapshot["conversations"]}
            return {
                "conversation": known.get(conversation, {"id": conversation, "title": ""}),
                "messages": self.messages[conversation],
            }
        self.requests.append((type_, body or {}))
        if effect := self.before_reply.get(type_):
            await effect(body or {})
        return self.replies.get(type_, {})
