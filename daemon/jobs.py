"""What one reply is: the job that asks for it, the turn the engine gets, and how it ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class JobResult:
    """How a reply ended, for whoever waits on its job (the HTTP API)."""

    status: str  # complete, cancelled, error or interrupted, as the stored message says
    text: str = ""
    finish_reason: str | None = None  # stop, length or cancelled (the engine's)
    stats: dict[str, Any] | None = None
    error: str | None = None
    code: str | None = None  # an error code (shared/protocol.py), when the engine gave one

    @property
    def ok(self) -> bool:
        return self.status == "complete"


@dataclass(eq=False)
class Job:
    """One reply to generate. A job with a conversation reads its prompt from the store and stores
    the reply; one without (an HTTP request) brings its messages and is not stored."""

    request_id: str
    conversation_id: str | None
    client: bytes  # for the per-client limit
    sampling: dict[str, Any]
    label: str | None = None  # who asked, when it is not a vramchat client: "http 127.0.0.1:53122"
    messages: list[dict[str, Any]] | None = None  # OpenAI's, tool calls and results included
    stop: list[str] = field(default_factory=list)  # extra stop strings
    # For the engine's `generate`: "grammar" (GBNF of the whole reply), "tools", "tool_grammar".
    engine: dict[str, Any] = field(default_factory=dict)
    streamed: bool = False  # someone reads pieces() (an HTTP stream); otherwise tokens are not queued
    enqueued_at: float = field(default_factory=time.time)
    # Told once how the job ended, wherever that happens (set by the queue: the daemon's metrics).
    on_finished: Callable[[JobResult], None] | None = field(default=None, repr=False)
    _pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue, repr=False)
    _ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _result: JobResult | None = field(default=None, repr=False)

    def view(self, position: int) -> dict[str, Any]:
        return {
            "request": self.request_id,
            "conversation": self.conversation_id,
            "label": self.label,
            "position": position,
            "enqueued_at": self.enqueued_at,
        }

    @property
    def done(self) -> bool:
        return self._result is not None

    def emit(self, text: str) -> None:
        if self.streamed:
            self._pieces.put_nowait(text)

    def finish(self, result: JobResult) -> None:
        first = self._result is None
        self._result = result
        self._pieces.put_nowait(None)
        self._ended.set()
        if first and self.on_finished is not None:
            self.on_finished(result)

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text as it is generated, until it ends."""
        while (text := await self._pieces.get()) is not None:
            yield text

    async def result(self) -> JobResult:
        await self._ended.wait()
        assert self._result is not None
        return self._result


@dataclass
class Turn:
    """What the engine gets for a job, and what maps its answer back to the stored messages."""

    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    overflow: dict[str, Any]  # {"policy", "dropped"}: see ChatModel.fitted_prompt
    passed: list[str] = field(default_factory=list)  # ids of the stored messages sent, after the system prompt
    stored: list[str] = field(default_factory=list)  # ids of every stored message, in order

    def context(self, dropped: int) -> dict[str, Any] | None:
        """Where the model's view started, for the reply's stats; None when it saw everything."""
        if not 0 < dropped < len(self.passed):
            return None
        first = self.passed[dropped]
        return {"first_message": first, "dropped": self.stored.index(first)}
