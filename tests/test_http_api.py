"""The OpenAI-compatible HTTP API, through the real `openai` package, curl and a real daemon."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from http_daemon import HttpDaemon, model_ready, start_http_daemon
from openai.types.chat import ChatCompletionMessageParam
from textual.widgets import Label

from vramchat.shared.client import Client
from vramchat.shared.protocol import Event
from vramchat.tui.app import VramchatApp
from vramchat.tui.widgets import ChatMessage, PromptInput

from helpers import DaemonFactory, collect_reply, free_port, paused

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France? Answer in English."}]
LONG_STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}
]


@pytest.fixture
def demo_http(daemon_factory: DaemonFactory) -> HttpDaemon:
    return start_http_daemon(daemon_factory)


async def streamed(
    client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam], *, max_tokens: int
) -> tuple[str, Any, str | None]:
    """The streamed text, its usage chunk and its finish reason (greedy, seed 1)."""
    stream = await client.chat.completions.create(
        model="any", messages=messages, stream=True, stream_options={"include_usage": True},
        max_tokens=max_tokens, temperature=0.0, seed=1,
    )  # fmt: skip
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage, finish


@pytest.mark.demo
async def test_a_stream_equals_the_whole_reply_and_the_stored_chat_with_the_engines_counts(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    async with demo_http.client() as client:
        greedy = {"temperature": 0.0, "seed": 1, "max_tokens": 60}
        whole = await client.chat.completions.create(model="any", messages=QUESTION, temperature=0.0, seed=1, max_tokens=60)
        text, usage, finish = await streamed(client, QUESTION, max_tokens=60)
        assert text == whole.choices[0].message.content and "Paris" in text
        assert finish == whole.choices[0].finish_reason == "stop"
        assert usage is not None and whole.usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

        # The same question as a vramchat chat: the same prompt, so the engine's own counts must match.
        async with Client(demo_http.daemon.runtime_dir) as vc:
            await vc.subscribe()
            events = vc.raw_events()
            request_id = "same-question"
            await vc.request("chat", {"content": QUESTION[0]["content"], "sampling": greedy}, request_id=request_id)
            _, stored = await collect_reply(events, request_id)
        assert stored is not None and stored["content"] == text
        assert stored["stats"]["prompt_tokens"] == usage.prompt_tokens
        assert stored["stats"]["generated_tokens"] == usage.completion_tokens


@pytest.mark.demo
async def test_stop_and_max_tokens_are_honoured(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    async with demo_http.client() as client:
        stopped = await client.chat.completions.create(model="any", messages=QUESTION, stop=["Paris"], temperature=0.0, seed=1)
        assert stopped.choices[0].message.content == "The capital of France is " and stopped.choices[0].finish_reason == "stop"
        text, usage, finish = await streamed(client, LONG_STORY, max_tokens=5)
        assert finish == "length" and usage.completion_tokens == 5 and text


async def test_requests_without_the_key_are_refused_and_the_daemon_stays_up(
    daemon_factory: DaemonFactory, models_dir: Path
) -> None:
    served = start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"))
    for key in ("", "vc-wrong"):
        with pytest.raises(openai.AuthenticationError) as refused:
            async with served.client(key=key or "-") as client:
                await client.chat.completions.create(model="any", messages=QUESTION)
        assert refused.value.status_code == 401 and "vramchat api-key" in str(refused.value)
    status, body = served.post("/v1/chat/completions", b"{}", key="nope")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    health = urllib.request.Request(served.url.removesuffix("/v1") + "/health")
    with pytest.raises(urllib.error.HTTPError) as no_header:
        urllib.request.urlopen(health, timeout=10)
    assert no_header.value.code == 401


async def test_bad_requests_say_what_to_change_and_a_5_mb_body_gets_413(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    served = start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"))
    await model_ready(served)
    status, body = served.post("/v1/chat/completions", json.dumps({"messages": QUESTION, "x": "y" * (5 << 20)}).encode())
    assert status == 413 and "larger than 4 MiB" in body["error"]["message"]
    cases = [
        (b"not json", "not JSON"),
        (json.dumps({"messages": []}).encode(), "non-empty list"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "role of system, user, assistant"),
        (json.dumps({"messages": QUESTION, "temperature": 9}).encode(), "temperature must be between 0"),
        (json.dumps({"messages": QUESTION, "max_tokens": 0}).encode(), "max_tokens must be between 1 and"),
        (json.dumps({"messages": QUESTION, "stop": [""]}).encode(), "stop must be"),
    ]
    for raw, message in cases:
        status, body = served.post("/v1/chat/completions", raw)
        assert status == 400 and message in body["error"]["message"], (raw[:60], body)
    # Unknown fields are ignored; the daemon is still up and answers.
    ok = {"messages": QUESTION, "max_tokens": 4, "frequency_penalty": 0.5, "logit_bias": {}, "user": "someone"}
    status, body = served.post("/v1/chat/completions", json.dumps(ok).encode())
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


@pytest.mark.demo
async def test_a_client_resending_its_history_gets_the_shared_prefix_from_the_state_cache(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    async with demo_http.client() as client, Client(demo_http.daemon.runtime_dir) as vc:
        first = await client.chat.completions.create(model="any", messages=QUESTION, max_tokens=20, temperature=0.0)
        # Another conversation takes the context meanwhile, as a TUI chat would.
        await vc.subscribe()
        events = vc.raw_events()
        await vc.request("chat", {"content": "Name a colour.", "sampling": {"max_tokens": 8}}, request_id="between")
        await collect_reply(events, "between")
        history: list[ChatCompletionMessageParam] = [
            *QUESTION,
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "And of Italy?"},
        ]
        second = await client.chat.completions.create(model="any", messages=history, max_tokens=20, temperature=0.0)
    assert first.usage is not None and second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    # The whole first exchange came back from the cache, not only the system prompt.
    assert cached >= first.usage.prompt_tokens, (cached, first.usage, second.usage)


async def test_a_prompt_longer_than_the_context_gets_400(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    served = start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"), "--ctx", "64")
    await model_ready(served)
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 4}
    status, body = served.post("/v1/chat/completions", json.dumps(long_prompt).encode())
    assert status == 400 and body["error"]["code"] == "prompt_too_long" and "context window is" in body["error"]["message"]


async def test_models_and_health(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    served = start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"))
    await model_ready(served)
    async with served.client() as client:
        listed = await client.models.list()
    names = [model.id for model in listed.data]
    assert names[0] == "tiny.gguf" and "tiny-gqa.gguf" in names
    request = urllib.request.Request(
        served.url.removesuffix("/v1") + "/health", headers={"Authorization": f"Bearer {served.key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "model": "tiny.gguf"}


@pytest.mark.demo
async def test_closing_the_connection_mid_stream_frees_the_engine(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    async with demo_http.client() as client:
        stream = await client.chat.completions.create(
            model="any", messages=LONG_STORY, stream=True, max_tokens=2000, temperature=0.0
        )
        arrived = []
        async for _chunk in stream:
            arrived.append(time.monotonic())
            if len(arrived) == 20:
                break
        token_time = (arrived[-1] - arrived[1]) / (len(arrived) - 2)
        await stream.close()
        closed_at = time.monotonic()
        second = await client.chat.completions.create(model="any", messages=QUESTION, stream=True, max_tokens=5, temperature=0.0)
        first_token_at = None
        async for chunk in second:
            if first_token_at is None and chunk.choices and chunk.choices[0].delta.content:
                first_token_at = time.monotonic()
        assert first_token_at is not None
        waited = first_token_at - closed_at
        # The abandoned reply had ~1,980 tokens to go, tens of seconds; the engine was free within a
        # token, and the new reply needed its prompt evaluated (under a second on the demo model).
        assert waited < 1980 * token_time / 10, f"{waited:.2f} s after the hang-up, at {token_time * 1000:.1f} ms a token"
        async with Client(demo_http.daemon.runtime_dir) as vc:
            queue = (await vc.request("status"))["queue"]
        assert queue == {"running": None, "pending": []}  # the abandoned job did not come back


@pytest.mark.demo
def test_curl_streams_a_reply(demo_http: HttpDaemon) -> None:
    asyncio.run(model_ready(demo_http))
    body = json.dumps({"model": "any", "messages": QUESTION, "stream": True, "temperature": 0})
    result = subprocess.run(
        ["curl", "-sS", "-N", f"{demo_http.url}/chat/completions", "-H", f"Authorization: Bearer {demo_http.key}",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [line.removeprefix("data: ") for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1] if json.loads(e)["choices"])
    assert "Paris" in text


@pytest.mark.demo
async def test_an_http_stream_and_a_tui_chat_share_the_queue_in_order(demo_http: HttpDaemon) -> None:
    await model_ready(demo_http)
    app = VramchatApp(Client(demo_http.daemon.runtime_dir, name="vramchat tui"))
    watcher = Client(demo_http.daemon.runtime_dir, name="watcher")
    async with demo_http.client() as client, app.run_test(size=(120, 40)) as pilot, watcher:
        deadline = time.monotonic() + 30
        while not (app.connected and app.state.model.get("state") == "ready"):
            assert time.monotonic() < deadline
            await pilot.pause(0.05)
        await watcher.subscribe()
        ran: list[str] = []
        watching = asyncio.create_task(queue_events(watcher.raw_events(), ran))
        stream = await client.chat.completions.create(
            model="any", messages=LONG_STORY, stream=True, max_tokens=150, temperature=0.0
        )
        chunks = aiter(stream)
        http_text, content_chunks = "", 0
        while content_chunks < 2:  # two tokens at least, so that the reply has a speed to show
            chunk = await anext(chunks)
            piece = "".join(choice.delta.content or "" for choice in chunk.choices)
            http_text, content_chunks = http_text + piece, content_chunks + bool(piece)
        # The engine is stopped until the checks below are done: the HTTP reply is still
        # generating through all of them, however fast the model runs.
        with paused(app.state.model["engine_pid"]):
            prompt = app.query_one(PromptInput)
            prompt.insert("What is the capital of France? Answer in English.")
            prompt.post_message(PromptInput.Submitted(prompt.text))
            queue = app.query_one("#queue", Label)
            named = re.compile(r"queued: 1 request\(s\) ahead of yours, a reply for http 127\.0\.0\.1:\d+ is generating")
            deadline = time.monotonic() + 30
            while not named.fullmatch(str(queue.render())):
                assert time.monotonic() < deadline, f"the queue line says {str(queue.render())!r}"
                await pilot.pause(0.05)
            status = await app.client.request("status")
            assert re.fullmatch(r"http 127\.0\.0\.1:\d+", status["queue"]["running"]["label"] or ""), status["queue"]
            http_request, tui_request = status["queue"]["running"]["request"], status["queue"]["pending"][0]["request"]
            deadline = time.monotonic() + 10  # the HTTP reply's speed is in telemetry, as any reply's
            while not ((app.state.latest_sample() or {}).get("generation") or {}).get("tokens_per_s"):
                assert time.monotonic() < deadline, app.state.latest_sample()
                await pilot.pause(0.1)
        async for chunk in chunks:
            http_text += "".join(choice.delta.content or "" for choice in chunk.choices)
        deadline = time.monotonic() + 60
        while not any(m["role"] == "assistant" and m["status"] == "complete" for m in tui_messages(app)):
            assert time.monotonic() < deadline, "the TUI's reply did not complete"
            await pilot.pause(0.1)
        reply = next(m for m in tui_messages(app) if m["role"] == "assistant")
        watching.cancel()
    assert http_text and "Paris" in reply["content"]
    # FIFO, from the daemon's own `queue` events rather than clocks: the TUI's reply ran after the
    # HTTP one, and each ran once.
    assert [request for n, request in enumerate(ran) if n == 0 or ran[n - 1] != request] == [http_request, tui_request]


async def queue_events(events: AsyncIterator[Event], ran: list[str]) -> None:
    """Append the request running in each `queue` event to `ran`, until cancelled."""
    async for event in events:
        if event.topic == "queue" and event.body["running"]:
            ran.append(event.body["running"]["request"])


def tui_messages(app: VramchatApp) -> list[dict[str, Any]]:
    return [widget.message for widget in app.query(ChatMessage)]


async def test_a_request_naming_a_conversation_is_stored_there(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    served = start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"))
    await model_ready(served)
    async with Client(served.daemon.runtime_dir) as vc:
        conversation = (await vc.request("conversation.create", {"title": "from curl"}))["conversation"]["id"]
        before = (await vc.request("conversation.list"))["conversations"]
        status, body = served.post("/v1/chat/completions", json.dumps({"messages": QUESTION, "max_tokens": 6}).encode())
        assert status == 200
        assert (await vc.request("conversation.list"))["conversations"] == before  # not stored without a name
        named = {"messages": QUESTION, "max_tokens": 6, "conversation": conversation[:8]}
        status, body = served.post("/v1/chat/completions", json.dumps(named).encode())
        assert status == 200
        stored = (await vc.request("conversation.get", {"id": conversation}))["messages"]
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "complete")]
    assert stored[0]["content"] == QUESTION[0]["content"] and stored[1]["content"] == body["choices"][0]["message"]["content"]


def test_a_non_loopback_address_is_refused_unless_the_config_says_so(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    refused = daemon_factory("--no-load", "--http", f"0.0.0.0:{free_port()}", start=False)
    refused.start(wait=False)
    assert refused.wait(20) != 0
    assert "not a loopback address" in refused.log() and "http_allow_remote" in refused.log()
    config = tmp_path / "remote.toml"
    config.write_text("http_allow_remote = true\n")
    allowed = daemon_factory("--no-load", "--config", str(config), "--http", f"0.0.0.0:{free_port()}")
    allowed.wait_for_log("HTTP API LISTENING ON 0.0.0.0")
    assert allowed.process is not None and allowed.process.poll() is None
