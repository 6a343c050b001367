"""The spine against a real vramchatd, a real engine process and real llama.cpp decoding."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from vramchat.shared.client import Client, DaemonNotRunning, RequestFailed, Snapshot
from vramchat.shared.protocol import CONTROL_SOCKET, Event

from helpers import (
    UNBOUNDED,
    DaemonFactory,
    DaemonProcess,
    chat,
    collect_reply,
    paused,
    start_long_reply,
    until,
    wait_ready,
)


def run_cli(daemon: DaemonProcess, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
    )


@pytest.mark.demo
def test_ask_streams_an_answer_from_the_quantized_demo_model(demo_daemon: DaemonProcess) -> None:
    """Decodes SmolLM2 Q4_1: a llama.cpp build with broken quantized kernels fails here."""
    result = run_cli(demo_daemon, "ask", "What is the capital of France? Answer in English.")  # the defaults a new user gets
    assert result.returncode == 0, result.stderr + demo_daemon.log()
    assert "Paris" in result.stdout


@pytest.mark.demo
def test_ask_reads_the_prompt_from_stdin_and_prints_json(demo_daemon: DaemonProcess) -> None:
    result = run_cli(demo_daemon, "ask", "--json", "--max-tokens", "8", input="Say hello.")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["role"] == "assistant" and reply["status"] == "complete"
    assert reply["stats"]["generated_tokens"] >= 1 and reply["stats"]["prompt_tokens"] > 0
    assert reply["stats"]["ttft_s"] > 0


async def test_two_clients_receive_the_same_tokens_as_stored(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as a, Client(tiny_daemon.runtime_dir) as b:
        await wait_ready(a)
        await a.subscribe()
        await b.subscribe()
        events_a, events_b = a.raw_events(), b.raw_events()
        request_id, accepted = await chat(a, "hello", {"temperature": 0.0, "max_tokens": 50})
        (tokens_a, final_a), (tokens_b, final_b) = await asyncio.gather(
            collect_reply(events_a, request_id), collect_reply(events_b, request_id)
        )
        assert tokens_a == tokens_b and len("".join(tokens_a)) > 10
        assert final_a is not None and final_a == final_b and final_a["status"] == "complete"
        stored = await a.request("conversation.get", {"id": accepted["conversation"]})
        assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
        assert stored["messages"][1]["content"] == "".join(tokens_a)
        assert final_a["stats"]["generated_tokens"] == 50


async def test_late_joiner_snapshot_plus_events_equals_the_stored_reply(big_context_daemon: DaemonProcess) -> None:
    """The Clone pattern's mid-reply path: the late client's snapshot holds the partial reply, and
    the events after it hold the rest. The reply is UNBOUNDED, and the engine is paused from the
    reply's 20th token until the late client has its snapshot; it ends when the test cancels it,
    after 20 more tokens came as events: at no speed can it end before either."""
    async with Client(big_context_daemon.runtime_dir) as first, Client(big_context_daemon.runtime_dir) as late:
        engine_pid = (await wait_ready(first))["engine_pid"]
        _, request_id, accepted, _ = await start_long_reply(first, 20)
        stream = late.stream()
        with paused(engine_pid):
            snapshot = await anext(stream)  # the late client subscribes, then asks for the snapshot
        assert isinstance(snapshot, Snapshot)
        in_flight = snapshot.body["in_flight"]
        assert in_flight is not None, "the reply ended before the late client attached: the snapshot has no in_flight"
        assert in_flight["request"] == request_id
        text = in_flight["text"]
        assert text, "the snapshot carries the partial reply"
        tokens_after, cancelled = 0, False
        async for event in stream:
            assert isinstance(event, Event), "no resync expected"
            if event.topic == "tok" and event.body["message"] == in_flight["message"]:
                text += event.body["text"]
                tokens_after += event.body["count"]
                if tokens_after >= 20 and not cancelled:
                    assert (await first.request("cancel", {"request": request_id})) == {"cancelled": "running"}
                    cancelled = True
            elif event.topic == "msg" and event.body["id"] == in_flight["message"] and event.body["status"] != "generating":
                break
        assert tokens_after >= 20, "the rest of the reply came as events after the snapshot"
        stored = await first.request("conversation.get", {"id": accepted["conversation"]})
        reply = stored["messages"][-1]
        assert reply["content"] == text
        assert reply["status"] == "cancelled" and reply["stats"]["tokens_after_cancel"] == 0


async def test_cancel_stops_within_one_token_and_keeps_the_text(big_context_daemon: DaemonProcess) -> None:
    async with Client(big_context_daemon.runtime_dir) as client:
        events, request_id, accepted, tokens = await start_long_reply(client, 10)  # UNBOUNDED: still running
        assert (await client.request("cancel", {"request": request_id})) == {"cancelled": "running"}
        after, final = await collect_reply(events, request_id)
        assert final is not None and final["status"] == "cancelled"
        # The engine's own cancel point, not a count that grows with the machine's speed: it checks
        # for a cancel after every token and generates none once it has seen one.
        assert final["stats"]["tokens_after_cancel"] == 0
        stored = await client.request("conversation.get", {"id": accepted["conversation"]})
        assert stored["messages"][-1]["content"] == "".join(tokens + after)
        with pytest.raises(RequestFailed) as error:
            await client.request("cancel", {"request": request_id})
        assert error.value.code == "not_found"


async def test_cancel_of_a_queued_request_removes_it(big_context_daemon: DaemonProcess) -> None:
    async with Client(big_context_daemon.runtime_dir) as client:
        await wait_ready(client)
        first, _ = await chat(client, "one", UNBOUNDED)  # still running at any speed when the test cancels it
        second, accepted = await chat(client, "two", {"temperature": 0.0, "max_tokens": 5})
        assert accepted["position"] == 2
        assert (await client.request("cancel", {"request": second})) == {"cancelled": "queued"}
        await client.request("cancel", {"request": first})


async def test_engine_killed_mid_reply_marks_it_interrupted_and_reloads(big_context_daemon: DaemonProcess) -> None:
    async with Client(big_context_daemon.runtime_dir) as client:
        model = await wait_ready(client)
        events, request_id, accepted, _ = await start_long_reply(client, 10)  # UNBOUNDED: killed mid-reply
        os.kill(model["engine_pid"], signal.SIGKILL)
        _, final = await collect_reply(events, request_id)
        assert final is not None and final["status"] == "interrupted"
        assert "SIGKILL" in final["error"]

        reloaded = await wait_ready(client)
        assert reloaded["engine_pid"] != model["engine_pid"]
        request_id, _ = await chat(client, "again", {"temperature": 0.0, "max_tokens": 5}, conversation=accepted["conversation"])
        _, final = await collect_reply(events, request_id)
        assert final is not None and final["status"] == "complete"


async def test_daemon_restart_keeps_every_stored_message(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()
        request_id, accepted = await chat(client, "hello", {"temperature": 0.0, "max_tokens": 20})
        await collect_reply(events, request_id)
        before = await client.request("conversation.get", {"id": accepted["conversation"]})
    assert tiny_daemon.stop() == 0
    tiny_daemon.start()
    async with Client(tiny_daemon.runtime_dir) as client:
        after = await client.request("conversation.get", {"id": accepted["conversation"]})
    assert after == before


async def test_daemon_killed_mid_reply_keeps_messages_and_marks_the_reply(big_context_daemon: DaemonProcess) -> None:
    async with Client(big_context_daemon.runtime_dir) as client:
        _, _, accepted, _ = await start_long_reply(client, 10)  # UNBOUNDED: killed mid-reply at any speed
    big_context_daemon.stop(signal.SIGKILL)
    big_context_daemon.start("--no-load")
    async with Client(big_context_daemon.runtime_dir) as client:
        stored = await client.request("conversation.get", {"id": accepted["conversation"]})
    user, reply = stored["messages"]
    assert user["content"] == "hello" and user["status"] == "complete"
    assert reply["status"] == "interrupted"


async def raw_request(runtime_dir: Path, *frames: bytes) -> dict[str, Any]:
    context = zmq.asyncio.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"ipc://{runtime_dir / CONTROL_SOCKET}")
    try:
        await socket.send_multipart(list(frames))
        reply: dict[str, Any] = msgpack.unpackb(await asyncio.wait_for(socket.recv(), 10), raw=False)
        return reply
    finally:
        socket.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"\xc1\xff not msgpack"], "bad_request"),
        ([msgpack.packb([1, 2, 3])], "bad_request"),
        ([msgpack.packb({"type": "status"})], "bad_request"),
        ([msgpack.packb({"id": "x", "type": 7})], "bad_request"),
        ([msgpack.packb({"id": "x", "type": "status", "body": "nope"})], "bad_request"),
        ([msgpack.packb({"id": "x", "type": "launch_missiles", "body": {}})], "unknown_type"),
        ([msgpack.packb({"id": "x", "type": "hello", "body": {"protocol": 99}})], "protocol_mismatch"),
        ([msgpack.packb({"id": "x", "type": "chat", "body": {"content": 42}})], "bad_request"),
        ([msgpack.packb({"id": "x", "type": "chat", "body": {"content": "hi", "sampling": {"top_k": "many"}}})], "bad_request"),
        ([msgpack.packb({"id": "x", "type": "load", "body": {"model": "tiny.gguf", "n_gpu_layers": -3}})], "invalid_value"),
        ([msgpack.packb({"id": "x", "type": "load", "body": {"model": "tiny.gguf", "n_threads": 10_000}})], "invalid_value"),
        ([msgpack.packb({"id": "x", "type": "conversation.get", "body": {"id": "ffffffffffff"}})], "not_found"),
        ([b"one", b"two"], "bad_request"),
        ([msgpack.packb({"id": "x", "type": "chat", "body": {"content": "x" * (5 << 20)}})], "too_large"),
    ],
)
async def test_malformed_requests_get_errors_and_the_daemon_stays_up(
    tiny_daemon: DaemonProcess, frames: list[bytes], code: str
) -> None:
    reply = await raw_request(tiny_daemon.runtime_dir, *frames)
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    async with Client(tiny_daemon.runtime_dir) as client:
        assert (await client.request("status"))["daemon"]["pid"] == tiny_daemon.pid


async def test_bad_loads_get_clear_errors_and_a_good_load_still_works(
    daemon_factory: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), "--models-dir", str(tmp_path))
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("not a model")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((models_dir / "tiny.gguf").read_bytes()[:100_000])
    async with Client(daemon.runtime_dir) as client:
        await wait_ready(client)
        for model, code, words in (
            (str(tmp_path / "missing.gguf"), "not_found", "vramchat models"),
            (str(text_file), "not_gguf", "not a GGUF"),
            (str(tmp_path), "not_gguf", "directory"),
            (str(corrupt), "not_gguf", "not a readable GGUF"),
            (str(truncated), "not_gguf", "truncated"),
            (str(models_dir.parent), "invalid_value", "outside the configured model dirs"),
        ):
            with pytest.raises(RequestFailed) as error:
                await client.request("load", {"model": model}, timeout=60)
            assert error.value.code == code and words in error.value.message, error.value
        with pytest.raises(RequestFailed) as error:
            await client.request("load", {"model": "tiny.gguf", "n_gpu_layers": 1000}, timeout=60)
        assert error.value.code == "invalid_value" and "2 layers + the output layer; choose 0..3" in error.value.message
        loaded = await client.request("load", {"model": "tiny-gqa.gguf", "n_ctx": 256}, timeout=60)
        assert loaded["model"]["state"] == "ready" and loaded["model"]["n_ctx"] == 256


async def test_auto_gpu_layers_and_the_swap_guard(tiny_daemon: DaemonProcess, demo_model: Path) -> None:
    """This machine has no GPU: auto fits 0 layers, or all of them with a budget that holds them."""
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        loaded = (await client.request("load", {"model": "tiny.gguf", "n_gpu_layers": "auto"}, timeout=60))["model"]
        assert loaded["n_gpu_layers"] == 0 and loaded["plan"]["vram_budget"] == 0
        # Without a GPU, llama.cpp keeps everything on the CPU; the plan says what a GPU would hold.
        planned = (
            await client.request("load", {"model": "tiny.gguf", "n_gpu_layers": "auto", "vram_budget": "2GiB"}, timeout=60)
        )["model"]
        assert planned["n_gpu_layers"] == 3 and planned["plan"]["prediction"]["output_on_gpu"]
        assert planned["split"]["cpu_bytes"] > 0 and planned["plan"]["prediction"]["tokens_per_s"] > 0
        with pytest.raises(RequestFailed) as error:
            # SmolLM2's KV cache alone is 22.5 GiB at a million tokens.
            await client.request("load", {"model": str(demo_model), "n_ctx": 1 << 20}, timeout=60)
        assert error.value.code == "would_swap" and "GiB short" in error.value.message
        assert (await client.request("status"))["model"]["name"] == "tiny.gguf"  # the running model stays


async def test_a_client_that_vanishes_mid_reply_costs_nothing(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as leaver:
        await wait_ready(leaver)
        _, accepted = await chat(leaver, "hello", {"temperature": 0.0, "max_tokens": 300})
    async with Client(tiny_daemon.runtime_dir) as stayer:
        await stayer.subscribe()
        events = stayer.raw_events()

        async def finished() -> dict[str, Any] | None:
            stored: dict[str, Any] = await stayer.request("conversation.get", {"id": accepted["conversation"]})
            messages = stored["messages"]
            return stored if len(messages) == 2 and messages[-1]["status"] != "generating" else None

        stored = await until(finished, timeout=60, what="the reply of the client that left is stored")
        assert stored["messages"][-1]["status"] == "complete"
        assert stored["messages"][-1]["stats"]["generated_tokens"] == 300
        next_id, _ = await chat(stayer, "next", {"max_tokens": 3})
        _, final = await collect_reply(events, next_id)
        assert final is not None and final["status"] == "complete"


async def test_prompt_longer_than_the_context_is_refused_with_its_length(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        loaded = await client.request("load", {"model": "tiny.gguf", "n_ctx": 64}, timeout=60)
        n_ctx = loaded["model"]["n_ctx"]  # llama.cpp rounds the context up (to 256 here)
        assert n_ctx >= 64
        await client.subscribe()
        events = client.raw_events()
        request_id, _ = await chat(client, "word " * n_ctx, {"max_tokens": 5})
        _, final = await collect_reply(events, request_id)
        assert final is not None and final["status"] == "error"
        assert f"context window is {n_ctx}" in final["error"]
        assert int(final["error"].split("conversation is ")[1].split(" tokens")[0]) > n_ctx


def test_cli_without_a_daemon_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(tmp_path), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not running" in result.stderr


async def test_client_raises_daemon_not_running_for_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        await Client(tmp_path).connect()


def test_cli_lists_models_and_conversations(tiny_daemon: DaemonProcess) -> None:
    models = run_cli(tiny_daemon, "models")
    assert models.returncode == 0 and "tiny.gguf" in models.stdout and "tiny-gqa.gguf" in models.stdout
    asked = run_cli(tiny_daemon, "ask", "--max-tokens", "5", "--temperature", "0", "hi")
    assert asked.returncode == 0, asked.stderr
    listed = run_cli(tiny_daemon, "conversations")
    assert listed.returncode == 0 and "hi" in listed.stdout


async def test_switching_back_to_a_conversation_reuses_its_saved_kv_state(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()

        async def ask(content: str, conversation: str | None) -> dict[str, Any]:
            request_id, _ = await chat(client, content, {"temperature": 0.0, "max_tokens": 8}, conversation)
            _, final = await collect_reply(events, request_id)
            assert final is not None and final["status"] == "complete"
            return final

        first = await ask("alpha " * 300, None)
        a = first["conversation_id"]
        await ask("beta " * 300, None)  # another conversation takes the context
        resumed = await ask("and then?", a)
        history = first["stats"]["prompt_tokens"]
        # Everything up to the previous reply is restored, not evaluated again.
        assert resumed["stats"]["prompt_cached_tokens"] >= history, resumed["stats"]
        assert resumed["stats"]["state_cache_entries"] >= 1 and resumed["stats"]["state_cache_bytes"] > 0


async def test_a_replys_kv_state_is_kept_while_idle_not_when_another_conversation_asks(tiny_daemon: DaemonProcess) -> None:
    """Copying a long conversation's state takes tens of milliseconds: done after the reply, it
    is off the next conversation's time to first token."""
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()
        request_id, _ = await chat(client, "gamma " * 200, {"temperature": 0.0, "max_tokens": 8}, None)
        _, final = await collect_reply(events, request_id)
        assert final is not None and final["status"] == "complete"
        at_done = final["stats"]["state_cache_bytes"]  # what the cache held before this reply's state

        async def kept() -> int | None:
            event = await asyncio.wait_for(anext(events), 10)
            grown = event.topic == "model" and (event.body.get("state_cache_bytes") or 0) > at_done
            return event.body["state_cache_bytes"] if grown else None

        # No other request comes: the engine keeps the state by itself and the daemon says so.
        await until(kept, timeout=10, what="a model event with more state cache bytes", interval=0)
