"""Hostile requests at the HTTP door (issue 23), built by Hypothesis from the API's own field names
with wrong types and extreme values, odd methods, paths and headers, against a real daemon.

Invariants: every answer is a success or a documented error (no 5xx, never `internal`), the daemon
keeps answering, a real completion works after the run, and nothing stored before it is lost.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest
from http_daemon import HttpDaemon, start_http_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramchat.shared import protocol
from vramchat.shared.client import Client

from helpers import DaemonFactory, chat, collect_reply, wait_ready

# Past the rate limit (100 requests a second per client) answers would only be 429s.
PAUSE_S = 0.012
EXAMPLES = 250
# What a refusal may carry: a code the protocol documents, or the HTTP layer's own (no code for
# 404/405; invalid_api_key for 401). Never "internal".
HTTP_CODES = {None, "invalid_api_key"} | (set(protocol.ERROR_CODES) - {"internal"})

EXTREMES = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, -(2**63), 1e308, -1e308, float("nan"), float("inf"), 0.5])
TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
# Hypothesis' text never holds a lone surrogate, which JSON's \ud800 escapes carry: add one.
ANY_TEXT = TEXT | st.builds(lambda head, surrogate, tail: head + surrogate + tail, TEXT, st.characters(categories=["Cs"]), TEXT)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | EXTREMES | ANY_TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(ANY_TEXT, children, max_size=3),
    max_leaves=8,
)
CONTENT = ANY_TEXT | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 3]), "text": ANY_TEXT | JSON_VALUES}), max_size=3
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "USER"]) | JSON_VALUES, "content": CONTENT | JSON_VALUES}
)
# JSON schemas of every kind the grammar converter meets, with odd names, values and bounds (issue 25).
SCHEMAS = st.recursive(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array"]) | JSON_VALUES},
        optional={"maxLength": EXTREMES | JSON_VALUES, "format": ANY_TEXT, "minimum": EXTREMES},
    )
    | st.fixed_dictionaries({"enum": st.lists(JSON_VALUES, max_size=3) | JSON_VALUES})
    | st.fixed_dictionaries({"const": JSON_VALUES})
    | st.fixed_dictionaries({"$ref": st.sampled_from(["#", "#/$defs/a", "#/properties", "https://x/s.json"]) | ANY_TEXT}),
    lambda children: (
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(ANY_TEXT, children, max_size=3)},
            optional={"required": st.lists(ANY_TEXT, max_size=3) | JSON_VALUES, "additionalProperties": st.booleans() | children},
        )
        | st.fixed_dictionaries({"type": st.just("array"), "items": children}, optional={"maxItems": EXTREMES})
        | st.fixed_dictionaries({"anyOf": st.lists(children, max_size=3)})
        | st.fixed_dictionaries({"$defs": st.fixed_dictionaries({"a": children}), "$ref": st.just("#/$defs/a")})
    ),
    max_leaves=6,
)
RESPONSE_FORMATS = st.fixed_dictionaries(
    {"type": st.sampled_from(["json_schema", "json_object", "text"]) | JSON_VALUES},
    optional={"json_schema": st.fixed_dictionaries({"name": ANY_TEXT, "schema": SCHEMAS}, optional={"strict": JSON_VALUES})},
)
FUNCTIONS = st.builds(
    lambda name, parameters: {"name": name, **({} if parameters is None else {"parameters": parameters})},
    st.sampled_from(["f", "g", "a b"]) | JSON_VALUES,
    st.none() | SCHEMAS,
)
TOOLS = st.lists(st.fixed_dictionaries({"type": st.just("function") | JSON_VALUES, "function": FUNCTIONS}), max_size=3)
TOOL_CHOICES = st.sampled_from(["auto", "none", "required"]) | st.builds(
    lambda name: {"type": "function", "function": {"name": name}}, st.sampled_from(["f", "g"]) | JSON_VALUES
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": ANY_TEXT | JSON_VALUES,
    "messages": st.lists(MESSAGE, min_size=1, max_size=4) | JSON_VALUES,
    "stream": st.booleans() | JSON_VALUES,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | JSON_VALUES}) | JSON_VALUES,
    "max_tokens": st.integers(1, 40) | EXTREMES | JSON_VALUES,
    "max_completion_tokens": st.integers(1, 40) | EXTREMES | JSON_VALUES,
    "temperature": st.floats(0, 2) | EXTREMES | JSON_VALUES,
    "top_p": st.floats(0, 1) | EXTREMES | JSON_VALUES,
    "seed": st.integers(0, 2**32) | EXTREMES | JSON_VALUES,
    "stop": ANY_TEXT | st.lists(ANY_TEXT, max_size=20) | JSON_VALUES,
    "conversation": st.sampled_from(["CONVERSATION", "", "0", "%", "_"]) | JSON_VALUES,
    "n": EXTREMES | JSON_VALUES,
    "tools": TOOLS | JSON_VALUES,
    "tool_choice": TOOL_CHOICES | JSON_VALUES,
    "response_format": RESPONSE_FORMATS | JSON_VALUES,
    "logprobs": st.booleans() | JSON_VALUES,
    "frequency_penalty": EXTREMES | JSON_VALUES,
}
# A request that is right but for one or two fields reaches the queue and the engine.
VALID_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant"]), "content": ANY_TEXT}), max_size=2
).flatmap(
    lambda opening: st.fixed_dictionaries({"role": st.just("user"), "content": ANY_TEXT}).map(lambda last: [*opening, last])
)
NEARLY_VALID = st.fixed_dictionaries(
    {"messages": VALID_MESSAGES, "max_tokens": st.integers(1, 20)},
    optional={name: value for name, value in FIELDS.items() if name not in ("messages", "max_tokens")},
)
BODIES = NEARLY_VALID | st.fixed_dictionaries({}, optional=FIELDS) | JSON_VALUES
RAW_BODIES = st.sampled_from([b"", b"{", b"\xff\xfe{}", b'{"messages": "\xc3\x28"}', b"[" * 100_000, b"null", b"\x00" * 64])
METHODS = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
PATHS = st.sampled_from(
    ["/v1/chat/completions"] * 6 + ["/v1/models", "/health", "/metrics", "/v1/nope", "/", "/v1/chat/completions/"]
)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=latin-1", "application/json; charset=utf-16", "text/plain", "*/*; q=x"]
)


def answer(served: HttpDaemon, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    port = int(served.url.split(":")[-1].split("/")[0])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check_answer(status: int, data: bytes, method: str) -> None:
    assert status < 500, (status, data[:500])
    if status == 200 and data.startswith(b"data: "):  # a stream: may end in an error event, never `internal`
        events = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
        assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
        assert all((event.get("error") or {}).get("code") != "internal" for event in events), events
    elif status >= 400 and method != "HEAD":
        if not data.startswith(b"{"):  # HTTP's own parser refused it (a control character in a header)
            assert status == 400 and data, (status, data)
            return
        error = json.loads(data)["error"]
        assert error["code"] in HTTP_CODES and error["message"], error


@pytest.fixture
def served(daemon_factory: DaemonFactory, models_dir: Path) -> HttpDaemon:
    # A small context: a reply that asks for every token it can is still short.
    return start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"), "--ctx", "512")


async def stored_conversation(served: HttpDaemon) -> tuple[str, list[dict[str, Any]]]:
    async with Client(served.daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()
        request_id, accepted = await chat(client, "remember this", {"max_tokens": 5, "temperature": 0.0})
        await asyncio.wait_for(collect_reply(events, request_id), 60)
        stored = await client.request("conversation.get", {"id": accepted["conversation"]})
        return accepted["conversation"], stored["messages"]


def test_hostile_http_requests_get_documented_answers_and_lose_nothing(served: HttpDaemon) -> None:
    conversation, before = asyncio.run(stored_conversation(served))
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        method=METHODS,
        path=PATHS,
        body=BODIES,
        raw=st.none() | RAW_BODIES,
        content_type=CONTENT_TYPES,
        key=st.sampled_from(["right"] * 8 + ["", "wrong"]),
        junk_header=ANY_TEXT.map(lambda text: text.encode("utf-8", "replace").decode("latin-1")[:200]),
    )
    def hostile(method: str, path: str, body: Any, raw: bytes | None, content_type: str, key: str, junk_header: str) -> None:
        if isinstance(body, dict) and body.get("conversation") == "CONVERSATION":
            body["conversation"] = conversation
        data = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
        headers = {"Content-Type": content_type, "X-Junk": junk_header.replace("\r", " ").replace("\n", " ")}
        if key:
            headers["Authorization"] = f"Bearer {served.key if key == 'right' else 'vc-wrong'}"
        status, reply = answer(served, method, path, data, headers)
        statuses.append(status)
        check_answer(status, reply, method)
        time.sleep(PAUSE_S)

    hostile()
    assert 200 in statuses and 400 in statuses, sorted(set(statuses))  # the run reached both sides of the door
    completion = {"model": "any", "max_tokens": 5, "messages": [{"role": "user", "content": "Hello"}]}
    status, reply = served.post("/v1/chat/completions", json.dumps(completion).encode())
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant", reply

    async def after() -> list[dict[str, Any]]:
        async with Client(served.daemon.runtime_dir) as client:
            assert (await client.request("status"))["model"]["state"] == "ready"
            stored: list[dict[str, Any]] = (await client.request("conversation.get", {"id": conversation}))["messages"]
            return stored

    stored_after = asyncio.run(after())
    assert stored_after[: len(before)] == before, stored_after


def test_text_that_is_not_unicode_is_refused_at_the_http_door(served: HttpDaemon) -> None:
    """Two bodies that once killed the generation worker or got a 500: a lone surrogate in valid
    JSON, and a body that is not UTF-8."""
    surrogate = b'{"model": "any", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    status, body = served.post("/v1/chat/completions", surrogate)
    assert status == 400 and body["error"]["code"] == "invalid_value", body
    assert "messages[0].content" in body["error"]["message"] and "U+D800" in body["error"]["message"]
    status, body = served.post("/v1/chat/completions", '{"messages": [{"role": "user", "content": "é"}]}'.encode("latin-1"))
    assert status == 400 and body["error"]["code"] == "invalid_value" and "not UTF-8" in body["error"]["message"], body
    good = {"model": "any", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    assert served.post("/v1/chat/completions", json.dumps(good).encode())[0] == 200
