"""OpenAI's reply shapes for one chat completion: the whole object, or server-sent chunks, with
tool calls split out of the text (daemon/tool_calls.py) when the request offered tools."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from vramchat.daemon.jobs import Job, JobResult
from vramchat.daemon.tool_calls import Piece, ToolCallScanner

# Said beside finish_reason "length" when the reply had to be JSON: what came is not.
CUT_JSON_NOTE = (
    "the reply reached max_tokens (or the context) before its JSON was complete, so it does not parse; "
    "send a larger max_tokens, or leave it out to let a JSON reply use the whole context"
)


class Completion:
    """One completion's replies; `tools` says whether the text may hold tool calls, `structured`
    whether it must be JSON."""

    def __init__(self, model: str, include_usage: bool, *, tools: bool = False, structured: bool = False) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model, self.include_usage, self.tools, self.structured = model, include_usage, tools, structured

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _finish(self, result: JobResult, scanner: ToolCallScanner | None) -> dict[str, Any]:
        """finish_reason, and a note when a JSON reply was cut."""
        if scanner is not None and scanner.called and result.finish_reason != "length":
            return {"finish_reason": "tool_calls"}
        reason = "length" if result.finish_reason == "length" else "stop"
        return (
            {"finish_reason": reason, "note": CUT_JSON_NOTE}
            if reason == "length" and self.structured
            else {"finish_reason": reason}
        )

    def whole(self, result: JobResult) -> dict[str, Any]:
        if not result.ok:
            return openai_error(result.error or "the reply failed", "server_error", result.code)
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        scanner = None
        if self.tools:
            scanner = ToolCallScanner()
            scanner.feed(result.text)
            scanner.finish()
            if scanner.calls:
                message = {"role": "assistant", "content": scanner.content.strip() or None}
                message["tool_calls"] = [call.openai() for call in scanner.calls]
        return {
            **self._envelope("chat.completion"),
            "choices": [{"index": 0, "message": message, **self._finish(result, scanner)}],
            "usage": usage(result),
        }

    def _chunk(self, delta: dict[str, Any], finish: dict[str, Any] | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, **(finish or {"finish_reason": None})}
        return sse({**self._envelope("chat.completion.chunk"), "choices": [choice]})

    async def chunks(self, job: Job) -> AsyncIterator[bytes]:
        yield self._chunk({"role": "assistant", "content": ""})
        scanner = ToolCallScanner() if self.tools else None
        async for text in job.pieces():
            if scanner is None:
                yield self._chunk({"content": text})
                continue
            for piece in scanner.feed(text):
                yield self._chunk(delta_of(piece))
        if scanner is not None:
            for piece in scanner.finish():
                yield self._chunk(delta_of(piece))
        result = await job.result()
        if not result.ok:
            yield sse(openai_error(result.error or "the reply failed", "server_error", result.code))
        else:
            yield self._chunk({}, self._finish(result, scanner))
            if self.include_usage:
                yield sse({**self._envelope("chat.completion.chunk"), "choices": [], "usage": usage(result)})
        yield b"data: [DONE]\n\n"


def delta_of(piece: Piece) -> dict[str, Any]:
    """A stream delta: text, the first of a call (id, type, name), or more of its arguments."""
    if piece.kind == "content":
        return {"content": piece.text}
    if piece.kind == "call":
        call = {"index": piece.index, "id": piece.call_id, "type": "function", "function": {"name": piece.text, "arguments": ""}}
        return {"tool_calls": [call]}
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def usage(result: JobResult) -> dict[str, Any]:
    """OpenAI's usage, from the engine's counts; `cached_tokens` are prompt tokens the KV state
    cache spared from evaluation (a client resending a growing history)."""
    stats = result.stats or {}
    prompt, completion = int(stats.get("prompt_tokens") or 0), int(stats.get("generated_tokens") or 0)
    cached = int(stats.get("prompt_cached_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def openai_error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
