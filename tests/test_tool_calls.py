"""Tool calls through the real `openai` package against a real daemon on the demo model, and the
scanner that splits a reply into text and calls."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from http_daemon import HttpDaemon, model_ready, start_http_daemon
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from vramchat.daemon.tool_calls import ToolCallScanner

from helpers import DaemonFactory

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMETERS},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The time in a timezone", "parameters": TIME_PARAMETERS},
    },
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
BOUNDED = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
WEATHER_QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def demo_http(daemon_factory: DaemonFactory) -> HttpDaemon:
    return start_http_daemon(daemon_factory)


async def streamed_call(client: openai.AsyncOpenAI, **request: Any) -> tuple[dict[str, Any], str | None, str]:
    """The call that a stream's deltas join to, its finish reason, and any text."""
    stream = await client.chat.completions.create(model="any", stream=True, **request)
    call: dict[str, Any] = {}
    finish, text = None, ""
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if delta.id is not None:  # the first delta of a call: its id, type and name
                    assert not call and delta.type == "function" and delta.function and delta.function.name
                    call = {"id": delta.id, "name": delta.function.name, "arguments": delta.function.arguments or ""}
                else:
                    assert call and delta.function and delta.function.name is None
                    call["arguments"] += delta.function.arguments or ""
    return call, finish, text


@pytest.mark.demo
async def test_a_named_or_required_call_has_arguments_valid_for_its_tool_streamed_or_not(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    choices: list[Any] = [{"type": "function", "function": {"name": "get_time"}}, "required"]
    async with demo_http.client() as client:
        for tool_choice in choices:
            request: dict[str, Any] = {
                "messages": WEATHER_QUESTION, "tools": TOOLS, "tool_choice": tool_choice,
                "temperature": 0.0, "seed": 3, "max_tokens": 120,
            }  # fmt: skip
            whole = await client.chat.completions.create(model="any", **request)
            choice = whole.choices[0]
            assert choice.finish_reason == "tool_calls"
            assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
            call = choice.message.tool_calls[0]
            assert call.type == "function" and call.id.startswith("call_")
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])

            joined, finish, text = await streamed_call(client, **request)
            assert finish == "tool_calls" and text == ""
            assert (joined["name"], joined["arguments"]) == (call.function.name, call.function.arguments)


@pytest.mark.demo
async def test_a_tool_result_sent_back_gets_a_reply_and_a_greeting_gets_text(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    async with demo_http.client() as client:
        called = await client.chat.completions.create(
            model="any", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required", temperature=0.0, max_tokens=120
        )
        call = called.choices[0].message.tool_calls
        assert call is not None
        history: list[ChatCompletionMessageParam] = [
            *WEATHER_QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in call]},  # type: ignore[misc]
            {"role": "tool", "tool_call_id": call[0].id, "content": '{"temperature": 18, "sky": "clear"}'},
        ]
        answer = await client.chat.completions.create(
            model="any", messages=history, tools=TOOLS, tool_choice="none", temperature=0.0, seed=1, max_tokens=60
        )
        assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
        assert answer.choices[0].finish_reason in ("stop", "length")

        greeting = await client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Hello!"}], tools=TOOLS, temperature=0.0, seed=1, max_tokens=60
        )
    choice = greeting.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason == "stop"


def test_tool_choice_and_tools_are_checked(daemon_factory: DaemonFactory) -> None:
    served = start_http_daemon(daemon_factory)
    question = {"messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": BOUNDED}}]},
            "tools[0].function.parameters.properties.n.minimum",
        ),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "stop": ["x"]}, "stop"),
    ]  # fmt: skip
    for body, named in cases:
        status, reply = served.post("/v1/chat/completions", json.dumps({**question, **body}).encode())
        assert status == 400 and named in reply["error"]["message"], (body, reply)


CALL = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris", "x": ["}", {"a": "\\""}]}}\n</tool_call>'


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(CALL)])
def test_the_scanner_finds_the_same_call_however_the_text_is_cut(size: int) -> None:
    text = "Let me check. " + CALL
    scanner = ToolCallScanner()
    pieces = [p for at in range(0, len(text), size) for p in scanner.feed(text[at : at + size])] + scanner.finish()
    assert scanner.content == "Let me check. " and scanner.called
    [call] = scanner.calls
    assert call.name == "get_time"
    assert json.loads(call.arguments) == {"timezone": "Europe/Paris", "x": ["}", {"a": '"'}]}
    assert "".join(p.text for p in pieces if p.kind == "arguments") == call.arguments


def test_text_that_only_looks_like_a_call_stays_text() -> None:
    scanner = ToolCallScanner()
    pieces = scanner.feed("a <tool_ca") + scanner.feed("t> b <tool_call>oops") + scanner.finish()
    assert "".join(p.text for p in pieces) == "a <tool_cat> b <tool_call>oops" == scanner.content
    assert not scanner.calls


@pytest.mark.demo
async def test_auto_calls_when_the_model_opens_a_call_and_the_grammar_finishes_it(demo_http: HttpDaemon) -> None:
    """The demo model knows no tools; asked to open a call, it writes <tool_call>, and from there
    the grammar holds it to a valid call (streamed deltas join to the same)."""
    await model_ready(demo_http)
    asked: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Use a tool call to get the weather in Paris. Start your reply with <tool_call>"}
    ]
    request: dict[str, Any] = {"messages": asked, "tools": TOOLS, "tool_choice": "auto", "temperature": 0.0, "max_tokens": 120}
    async with demo_http.client() as client:
        whole = await client.chat.completions.create(model="any", **request)
        joined, finish, text = await streamed_call(client, **request)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    call = choice.message.tool_calls[0].function
    jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
    assert finish == "tool_calls" and text == (choice.message.content or "")
    assert (joined["name"], joined["arguments"]) == (call.name, call.arguments)
