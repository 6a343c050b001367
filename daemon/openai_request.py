"""A chat completion request's body, read and checked before anything is queued.

Every field OpenAI documents is supported, refused with 400 (it would change what the reply
means, and silence would be a wrong answer), or ignored (it only tunes or labels): the lists
below, which docs/protocol.md ("HTTP API") repeats.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import vramchat.daemon.llama.grammar as grammar  # the one module of daemon/llama the daemon imports: pure Python
from vramchat.daemon.generation import checked_sampling
from vramchat.shared import protocol
from vramchat.shared.protocol import ProtocolError

ROLES = ("system", "user", "assistant", "tool", "developer")
SUPPORTED = (
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "min_p",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "stream",
    "stream_options",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "conversation",
)
# Read by nobody: they label or tune what vramchat has no knob for. Listed, as SUPPORTED is, for
# the test that keeps docs/protocol.md's table of fields whole.
IGNORED = (
    "model",
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "reasoning_effort",
    "verbosity",
)
# Refused unless absent, null, or the value that means "as without it"; "modalities" too (below).
REFUSED: dict[str, tuple[Any, str]] = {
    "n": (1, "one choice per request is supported; send n: 1 or leave it out, and send several requests for more"),
    "logprobs": (False, "log probabilities are not supported; leave logprobs out"),
    "top_logprobs": (None, "log probabilities are not supported; leave top_logprobs out"),
    "audio": (None, "audio output is not supported; vramchat serves text models"),
    "prediction": (None, "predicted outputs are not supported; leave prediction out"),
    "web_search_options": (None, "web search is not supported; leave web_search_options out"),
    "functions": (None, "the deprecated functions field is not supported; send tools (type function) instead"),
    "function_call": (None, "the deprecated function_call field is not supported; send tool_choice instead"),
    "logit_bias": ({}, "logit_bias is not supported; leave it out or send {}"),
}
MAX_TOOLS = 128
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A structured reply that names no max_tokens may use the whole context: a cut reply is not JSON.
STRUCTURED_MAX_TOKENS = (1 << 31) - 1


@dataclass
class ChatRequest:
    """What the HTTP API makes of one body."""

    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    conversation: str | None = None  # a vramchat extension: store the exchange there
    engine: dict[str, Any] = field(default_factory=dict)  # grammar, tools, tool_grammar: for the engine
    structured: bool = False  # the reply must be JSON
    tools_offered: bool = False  # the reply may hold tool calls


def parse_request(body: dict[str, Any]) -> ChatRequest:
    """The request in `body`, or ProtocolError (400) naming the field and what is supported."""
    for name, (neutral, why) in REFUSED.items():
        if body.get(name) is not None and body[name] != neutral:
            raise ProtocolError("invalid_value", f"{name}: {why}")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise ProtocolError("invalid_value", 'modalities: only ["text"] is supported; vramchat serves text models')
    stream = protocol.field_of(body, "stream", bool, False) or False
    options = protocol.field_of(body, "stream_options", dict, {}) or {}
    request = ChatRequest(
        messages=parse_messages(body.get("messages")),
        sampling=parse_sampling(body),
        stop=parse_stop(body.get("stop")),
        stream=stream,
        include_usage=stream and bool(protocol.field_of(options, "include_usage", bool, False)),
    )
    conversation = body.get("conversation")
    if conversation is not None and not isinstance(conversation, str):
        raise ProtocolError("invalid_value", "conversation must be a conversation id (a string)")
    request.conversation = conversation
    parse_response_format(body.get("response_format"), request)
    parse_tools(body, request)
    if request.engine.get("grammar") and request.stop:
        raise ProtocolError(
            "invalid_value", "stop cannot be combined with a JSON reply or a required tool call: the grammar ends it"
        )
    if request.structured and "max_tokens" not in request.sampling:
        request.sampling["max_tokens"] = STRUCTURED_MAX_TOKENS  # the engine keeps it to the context's room
    return request


def control_json_schema(spec: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """The control protocol's `chat` `json_schema` ({"schema", "strict"?}), checked as the HTTP
    API's: the engine fields of a reply held to the schema; `sampling` gets its default max_tokens."""
    schema, strict = spec.get("schema"), spec.get("strict", False)
    if not isinstance(schema, dict) or not isinstance(strict, bool):
        raise ProtocolError("invalid_value", "json_schema needs schema (a JSON schema object) and optionally strict (a boolean)")
    sampling.setdefault("max_tokens", STRUCTURED_MAX_TOKENS)
    return {"grammar": checked_grammar(schema, strict=strict, where="json_schema.schema")}


def parse_sampling(body: dict[str, Any]) -> dict[str, Any]:
    sampling = {
        name: body[name]
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty")
        if body.get(name) is not None
    }
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    sampling = checked_sampling(sampling)
    if "temperature" in sampling and sampling["temperature"] > 2:
        raise ProtocolError("invalid_value", "temperature must be between 0 and 2")
    for name in ("frequency_penalty", "presence_penalty"):  # llama.cpp's, over its last 64 tokens
        value = protocol.field_of(body, name, (int, float), None)
        if value is not None and not -2 <= value <= 2:
            raise ProtocolError("invalid_value", f"{name} must be between -2 and 2")
        if value:
            sampling[name] = float(value)
    return sampling


def parse_response_format(raw: Any, request: ChatRequest) -> None:
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""
    if raw is None:
        return
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        request.engine["grammar"] = grammar.json_object_grammar()
    elif kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema"), dict):
            raise ProtocolError("invalid_value", "response_format.json_schema needs a name (a string) and a schema (an object)")
        strict = spec.get("strict", False)
        if not isinstance(strict, bool | None):
            raise ProtocolError("invalid_value", "response_format.json_schema.strict must be true or false")
        request.engine["grammar"] = checked_grammar(
            spec["schema"], strict=bool(strict), where="response_format.json_schema.schema"
        )
    else:
        raise ProtocolError("invalid_value", "response_format.type must be text, json_object or json_schema")
    request.structured = True


def checked_grammar(schema: dict[str, Any], *, strict: bool, where: str) -> str:
    """The grammar of `schema`, or 400 naming the part the grammar cannot enforce."""
    try:
        return grammar.schema_grammar(schema, strict=strict, where=where)
    except grammar.SchemaError as exc:
        raise ProtocolError("invalid_value", str(exc)) from None


def parse_tools(body: dict[str, Any], request: ChatRequest) -> None:
    """tools, tool_choice and parallel_tool_calls. A reply makes at most one call, which
    parallel_tool_calls (true by default: "may") allows."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    protocol.field_of(body, "parallel_tool_calls", bool, None)
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise ProtocolError("invalid_value", "tool_choice needs tools")
        return
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ProtocolError("invalid_value", f"tools must be a list of at most {MAX_TOOLS} functions")
    functions = [checked_function(tool, index) for index, tool in enumerate(tools)]
    names = [name for name, _ in functions]
    if len(set(names)) != len(names):
        raise ProtocolError("invalid_value", "tools: two functions have the same name")
    if choice is None or choice == "auto":
        chosen, required = functions, False
    elif choice == "none":
        return
    elif choice == "required":
        chosen, required = functions, True
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen, required = [f for f in functions if f[0] == name], True
        if not chosen:
            raise ProtocolError("invalid_value", f"tool_choice names {name!r}, which is not among the tools")
    else:
        raise ProtocolError(
            "invalid_value", 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name"}}'
        )
    if request.structured:
        raise ProtocolError("invalid_value", 'response_format cannot be combined with tools unless tool_choice is "none"')
    if request.conversation is not None:
        raise ProtocolError("invalid_value", "tools cannot be used with a stored conversation; send the messages instead")
    request.engine["tools"] = tools
    request.engine["grammar" if required else "tool_grammar"] = grammar.tool_call_grammar(chosen, opened=not required)
    request.tools_offered = True


def checked_function(tool: Any, index: int) -> tuple[str, dict[str, Any]]:
    """A tool's name and parameters schema (checked as response_format's is)."""
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ProtocolError("invalid_value", f'{where}: only {{"type": "function", "function": {{...}}}} tools are supported')
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise ProtocolError("invalid_value", f"{where}.function.name must be 1 to 64 letters, digits, _ or -")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ProtocolError("invalid_value", f"{where}.function.parameters must be a JSON schema of type object")
    strict = function.get("strict") is True
    checked_grammar({"type": "object", **parameters}, strict=strict, where=f"{where}.function.parameters")
    return name, {"type": "object", **parameters}


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """OpenAI's messages: content as a string or text parts; assistant tool_calls; tool results."""
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("invalid_value", "messages must be a non-empty list of {role, content}")
    messages = [parse_message(message, index) for index, message in enumerate(raw)]
    if not any(m["role"] == "user" for m in messages):
        raise ProtocolError("invalid_value", "messages needs at least one user message")
    return messages


def parse_message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ProtocolError("invalid_value", f"{where} needs a role of {', '.join(ROLES)}")
    role = "system" if message["role"] == "developer" else message["role"]
    if message.get("function_call") is not None:
        raise ProtocolError("invalid_value", f"{where}.function_call is the deprecated form; send tool_calls")
    content = text_of(message.get("content"), where)
    parsed: dict[str, Any] = {"role": role, "content": content}
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise ProtocolError("invalid_value", f"{where}: a tool message needs tool_call_id (a string)")
        parsed["tool_call_id"] = message["tool_call_id"]
    calls = message.get("tool_calls")
    if calls is not None and role == "assistant" and calls != []:
        parsed["tool_calls"] = [
            parse_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls if isinstance(calls, list) else [None])
        ]
    elif content is None:
        raise ProtocolError("invalid_value", f"{where}.content must be a string")
    return parsed


def text_of(content: Any, where: str) -> str | None:
    """Content as text: a string, or a list of text parts (any other part is refused by kind)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ProtocolError("invalid_value", f"{where}.content must be a string")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal") and isinstance(part.get(kind), str):
            texts.append(part[kind])
        elif kind in ("image_url", "input_audio", "file"):
            raise ProtocolError("invalid_value", f"{where}: {kind} content is not supported: the loaded model reads text only")
        else:
            raise ProtocolError("invalid_value", f"{where}: only text content parts are supported")
    return "".join(texts)


def parse_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(call.get("id"), str) or call.get("type", "function") != "function":
        raise ProtocolError("invalid_value", f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}')
    if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
        raise ProtocolError("invalid_value", f"{where}.function needs a name and arguments (a JSON string)")
    try:
        json.loads(function["arguments"])
    except ValueError:
        raise ProtocolError("invalid_value", f"{where}.function.arguments is not JSON") from None
    return {"id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": function["arguments"]}}


def parse_stop(raw: Any) -> list[str]:
    stops = [raw] if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise ProtocolError("invalid_value", "stop must be a string or a list of at most 16 non-empty strings")
    return stops
