"""Structured outputs: response_format's JSON schema holds the demo model to valid JSON, through
the real `openai` package against a real daemon; what the grammar cannot enforce is a 400."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from http_daemon import HttpDaemon, model_ready, start_http_daemon
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam
from test_daemon import run_cli
from test_hostile_http import SCHEMAS

from vramchat.daemon import openai_request
from vramchat.daemon.llama.chat_model import ChatModel
from vramchat.daemon.llama.grammar import GrammarDeadEnd, SchemaError, schema_grammar
from vramchat.daemon.llama.tools import check_grammar

from gguf_factory import TinyModelSpec, write_tiny_llama
from helpers import DaemonFactory, DaemonProcess

# Nested object, enum, array and required fields; its lengths are bounded, so a whole reply fits
# in max_tokens whatever a 135M model at temperature 1 writes into the strings.
PET: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "species": {"enum": ["cat", "dog", "parrot"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer"}, "verified": {"type": "boolean"}},
            "required": ["age", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "species", "tags", "owner"],
    "additionalProperties": False,
}
ASK_PET: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Describe a pet as JSON."}]
PET_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}


@pytest.fixture
def demo_http(daemon_factory: DaemonFactory) -> HttpDaemon:
    return start_http_daemon(daemon_factory)


async def streamed_text(client: openai.AsyncOpenAI, **request: Any) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(model="any", stream=True, **request)
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.demo
async def test_a_json_schema_reply_validates_every_time_at_temperature_1_streamed_or_not(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    valid = 0
    async with demo_http.client() as client:
        for seed in range(10):
            whole = await client.chat.completions.create(
                model="any", messages=ASK_PET, response_format=PET_FORMAT, temperature=1.0, seed=seed, max_tokens=256
            )
            jsonschema.validate(json.loads(whole.choices[0].message.content or ""), PET)
            assert whole.choices[0].finish_reason == "stop"
            valid += 1
        for seed in range(10, 20):
            text, finish = await streamed_text(
                client, messages=ASK_PET, response_format=PET_FORMAT, temperature=1.0, seed=seed, max_tokens=256
            )
            jsonschema.validate(json.loads(text), PET)
            assert finish == "stop"
            valid += 1
    assert valid == 20


@pytest.mark.demo
async def test_json_object_parses_and_a_cut_json_reply_says_so(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    async with demo_http.client() as client:
        reply = await client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": 'Reply with a JSON object whose key "capital" is the capital of France.'}],
            response_format={"type": "json_object"},
            temperature=0.0,
            seed=1,
            max_tokens=200,
        )
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
        cut = await client.chat.completions.create(
            model="any", messages=ASK_PET, response_format=PET_FORMAT, temperature=0.0, max_tokens=4
        )
    choice = cut.choices[0]
    assert choice.finish_reason == "length"
    assert "max_tokens" in (choice.model_extra or {})["note"]
    with pytest.raises(ValueError):
        json.loads(choice.message.content or "")


def schema_format(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, **extra}}}


IMAGE = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (schema_format({"type": "integer", "minimum": 0}), "schema.minimum"),
        (schema_format({"type": "string", "pattern": "^a+$"}), "schema.pattern"),
        (schema_format({"not": {"type": "null"}}), "schema.not"),
        (schema_format({"$ref": "https://example.com/s.json"}), "schema.$ref"),
        (schema_format({"type": "object", "properties": {"a": {"type": "string"}}}, strict=True), "with strict"),
        ({"n": 2}, "n: one choice"),
        ({"logprobs": True}, "logprobs"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "tools"),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, "image_url"),
    ],
)
def test_what_the_api_cannot_honour_is_a_400_that_says_why(tiny_http: HttpDaemon, body: dict[str, Any], named: str) -> None:
    status, reply = tiny_http.post(
        "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode()
    )
    assert status == 400, reply
    assert named in reply["error"]["message"] and reply["error"]["code"] == "invalid_value"


@pytest.fixture
def tiny_http(daemon_factory: DaemonFactory, models_dir: Path) -> HttpDaemon:
    return start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
        {"type": "number", "multipleOf": 2},
        {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        {"type": "string", "format": "email"},
        {"anyOf": [{"type": "string"}], "type": "string", "maxLength": 3},
        {"type": "string", "maxLength": 10**9},
        {"if": {"type": "string"}, "then": {"maxLength": 2}},
    ],
)
def test_every_part_the_converter_would_ignore_is_refused_by_name(schema: dict[str, Any]) -> None:
    with pytest.raises(SchemaError, match=r"schema"):
        schema_grammar(schema, strict=False)


@pytest.fixture(scope="module")
def tiny_model() -> Iterator[ChatModel]:
    """A vocabulary for llama.cpp's grammar parser (the random-weights model: nothing is generated)."""
    directory = Path(tempfile.mkdtemp(prefix="vc-grammar-"))
    model = ChatModel.load(
        str(write_tiny_llama(directory / "tiny.gguf", TinyModelSpec())), n_gpu_layers=0, n_ctx=512, n_threads=1
    )
    yield model
    model.llm.close()
    shutil.rmtree(directory, ignore_errors=True)


@settings(max_examples=400, deadline=None)
@given(schema=SCHEMAS, strict=st.booleans())
def test_any_schema_gets_a_grammar_or_a_schema_error_never_a_crash(tiny_model: ChatModel, schema: Any, strict: bool) -> None:
    """Hostile schemas (test_hostile_http's strategy) at the converter directly, many more of them."""
    try:
        grammar = schema_grammar(schema, strict=strict)
    except SchemaError as exc:
        assert str(exc).startswith("schema")
    else:
        check_grammar(tiny_model, grammar)  # llama.cpp parses it: the engine would refuse it otherwise


@pytest.mark.demo
def test_ask_with_a_json_schema_file_prints_a_reply_that_validates(demo_daemon: DaemonProcess, tmp_path: Path) -> None:
    schema_file = tmp_path / "pet.json"
    schema_file.write_text(json.dumps(PET))
    result = run_cli(demo_daemon, "ask", "--json-schema", str(schema_file), "--temperature", "1", "Describe a pet.", timeout=300)
    assert result.returncode == 0, result.stderr + demo_daemon.log()
    jsonschema.validate(json.loads(result.stdout), PET)

    schema_file.write_text(json.dumps({"type": "integer", "maximum": 3}))
    refused = run_cli(demo_daemon, "ask", "--json-schema", str(schema_file), "Pick a number.")
    assert refused.returncode != 0 and "json_schema.schema.maximum" in refused.stderr


def test_the_protocol_doc_says_what_becomes_of_every_request_field() -> None:
    """docs/protocol.md's HTTP API table names every field that is supported, refused or ignored."""
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    http = doc[doc.index("## HTTP API") :]
    fields = {*openai_request.SUPPORTED, *openai_request.IGNORED, *openai_request.REFUSED, "modalities", "model"}
    assert [name for name in sorted(fields) if f"`{name}`" not in http] == []


def test_a_vocabulary_that_cannot_write_the_schema_ends_the_reply_not_the_process(tiny_model: ChatModel) -> None:
    """The tiny model has no token that reads "{": under the grammar nothing may come first, and
    llama.cpp would abort on whatever it drew. The reply fails with an exception instead."""
    prompt = tiny_model.prompt([{"role": "user", "content": "pet"}])
    with pytest.raises(GrammarDeadEnd, match="cannot write this schema"):
        "".join(tiny_model.reply(prompt, {"temperature": 1.0, "max_tokens": 50}, schema_grammar(PET, strict=True)))


@pytest.mark.demo
def test_valid_json_even_when_most_draws_break_the_grammar(demo_model: Path) -> None:
    """At temperature 2 with no top-k most tokens drawn break the grammar, so most steps take
    grammar_sampling's second path (the grammar over the whole vocabulary)."""
    model = ChatModel.load(str(demo_model), n_gpu_layers=0, n_ctx=1024, n_threads=None)
    try:
        prompt = model.prompt([{"role": "user", "content": "Describe a pet as JSON."}])
        for seed in range(3):
            model.llm.set_seed(seed)
            sampling = {"temperature": 2.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "max_tokens": 400}
            reply = model.reply(prompt, sampling, schema_grammar(PET, strict=True))
            text = "".join(reply)
            assert reply.finish_reason == "stop", text
            jsonschema.validate(json.loads(text), PET)
    finally:
        model.llm.close()
