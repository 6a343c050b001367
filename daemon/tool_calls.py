"""A reply's text split into content and tool calls, as the text arrives.

The engine writes a call in the Hermes form, <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
(daemon/llama/tools.py; a grammar holds it to that, name first). A streamed reply and a whole one
go through the same scanner, so the deltas of a stream join to exactly the whole reply's call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from vramchat.daemon.llama.grammar import TOOL_CLOSE, TOOL_OPEN  # pure Python (see its docstring)

CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')
CALL_TAIL = re.compile(r"\s*\}\s*" + re.escape(TOOL_CLOSE))


@dataclass
class Piece:
    """Content text, the start of call `index` (with its id and name), or more of its arguments."""

    kind: str  # content, call or arguments
    text: str = ""
    index: int = 0
    call_id: str = ""


@dataclass
class ToolCall:
    call_id: str
    name: str
    arguments: str = ""
    complete: bool = False

    def openai(self) -> dict[str, object]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallScanner:
    """Feed it text; it returns the pieces that are certain so far. Text that may be the start of
    a call is held back until it is known."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    _state: str = "text"  # text, head (before the arguments), arguments, tail
    _held: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    @property
    def called(self) -> bool:
        """Whether the reply made at least one whole call."""
        return any(call.complete for call in self.calls)

    def feed(self, text: str) -> list[Piece]:
        self._held += text
        pieces: list[Piece] = []
        while self._held:
            before = (len(self._held), self._state)
            getattr(self, f"_{self._state}")(pieces)
            if (len(self._held), self._state) == before:
                break  # waiting for more text
        return pieces

    def finish(self) -> list[Piece]:
        """The end of the reply: what is still held back is content (a call cut short stays a call)."""
        held, self._held = self._held, ""
        if self._state == "text" or self._state == "head":
            prefix = TOOL_OPEN if self._state == "head" else ""
            self.content += prefix + held
            return [Piece("content", prefix + held)] if prefix + held else []
        return []

    def _text(self, pieces: list[Piece]) -> None:
        at = self._held.find(TOOL_OPEN)
        if at != -1:
            out, self._held, self._state = self._held[:at], self._held[at + len(TOOL_OPEN) :], "head"
        else:
            keep = max((n for n in range(1, len(TOOL_OPEN)) if self._held.endswith(TOOL_OPEN[:n])), default=0)
            out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        if out:
            self.content += out
            pieces.append(Piece("content", out))

    def _head(self, pieces: list[Piece]) -> None:
        found = CALL_HEAD.match(self._held)
        if found is None:
            return
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", json.loads(found.group(1)))
        self.calls.append(call)
        pieces.append(Piece("call", index=len(self.calls) - 1, call_id=call.call_id, text=call.name))
        self._held, self._state = self._held[found.end() :], "arguments"
        self._depth, self._in_string, self._escaped = 0, False, False

    def _arguments(self, pieces: list[Piece]) -> None:
        """The arguments object, character by character, until its braces balance."""
        end = len(self._held)
        for at, char in enumerate(self._held):
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (char == "\\", char != '"')
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = at + 1
                    self._state = "tail"
                    break
        out, self._held = self._held[:end], self._held[end:]
        call = self.calls[-1]
        call.arguments += out
        pieces.append(Piece("arguments", out, index=len(self.calls) - 1))

    def _tail(self, pieces: list[Piece]) -> None:
        found = CALL_TAIL.match(self._held)
        if found is not None:
            self.calls[-1].complete = True
            self._held, self._state = self._held[found.end() :].lstrip("\n"), "text"
