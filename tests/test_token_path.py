"""The token path with coalescing: the engine's frames, what every client receives, late joiners, cancel."""

from __future__ import annotations

import asyncio
import itertools
import socket
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest

from vramchat.daemon.engine_channel import EngineEnd
from vramchat.daemon.llama.chat_model import ChatModel
from vramchat.daemon.llama.engine import Engine, TokenFrames
from vramchat.shared.client import Client, Snapshot
from vramchat.shared.protocol import Event

from helpers import DaemonProcess, paused, start_long_reply, wait_ready

# --- the engine's frames, on a made-up clock ---------------------------------------------------


def frames_of(stamps: list[float], texts: list[str] | None = None, window_s: float = 0.015) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    frames = TokenFrames(sent.append, "r1", window_s)
    for i, now in enumerate(stamps):
        frames.add(texts[i] if texts else f"<{i}>", now)
    frames.flush()
    return sent


def test_a_slow_model_sends_every_token_at_once() -> None:
    sent = frames_of([1.0 + 0.02 * i for i in range(10)])  # 50 tok/s, slower than one per window
    assert [f["t"] for f in sent] == [[1.0 + 0.02 * i] for i in range(10)]
    assert "".join(f["text"] for f in sent) == "".join(f"<{i}>" for i in range(10))


def test_a_fast_model_coalesces_and_no_token_waits_past_the_window() -> None:
    stamps = [1.0 + 0.001 * i for i in range(100)]  # 1,000 tok/s
    sent = frames_of(stamps)
    assert sent[0]["t"] == [1.0], "the first token goes at once"
    assert [t for f in sent for t in f["t"]] == stamps, "every token once, in order"
    assert "".join(f["text"] for f in sent) == "".join(f"<{i}>" for i in range(100))
    assert 1 < len(sent) < 15
    for before, frame in itertools.pairwise(sent):
        # A frame leaves with the token that arrives after its first has waited the window.
        assert frame["t"][-1] - frame["t"][0] <= 0.015 + 1e-9
        assert before["t"][-1] < frame["t"][0]


def test_a_token_without_text_can_end_a_frame() -> None:
    sent = frames_of([1.0, 1.005, 1.010, 1.030], texts=["a", "b", "", ""])
    assert [f["text"] for f in sent] == ["a", "b"]
    assert sent[1]["t"] == [1.005]


# --- the engine's token loop in this process ---------------------------------------------------


@pytest.fixture
def engine(models_dir: Path) -> Any:
    """An Engine holding the tiny model, on a socketpair whose other end the test holds."""
    import llama_cpp

    daemon_side, engine_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    engine = Engine(EngineEnd(engine_side))
    engine.model = ChatModel.load(str(models_dir / "tiny.gguf"), n_gpu_layers=0, n_ctx=1024, n_threads=1)
    engine.llama_cpp = llama_cpp
    yield engine, daemon_side
    engine.model.llm.close()
    daemon_side.close()
    engine_side.close()


def received(daemon_side: socket.socket) -> list[dict[str, Any]]:
    """Every message the engine has sent so far."""
    unpacker = msgpack.Unpacker(raw=False)
    daemon_side.setblocking(False)
    try:
        while data := daemon_side.recv(1 << 20):
            unpacker.feed(data)
    except BlockingIOError:
        pass
    return list(unpacker)


def generate(engine: Engine, max_tokens: int) -> None:
    engine.generate(
        {
            "request": "r1",
            "conversation": "c1",
            "messages": [{"role": "user", "content": "hello"}],
            "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "seed": 1},
        }
    )


def test_a_cancel_waiting_when_the_first_token_comes_stops_the_reply_there(engine: Any) -> None:
    engine, daemon_side = engine
    daemon_side.send(msgpack.packb({"op": "cancel", "request": "r1"}))
    generate(engine, 500)
    *_, done = received(daemon_side)
    assert done["ev"] == "done" and done["finish_reason"] == "cancelled"
    assert done["stats"]["generated_tokens"] == 1


def test_a_cancel_mid_reply_stops_after_the_token_in_progress_and_sends_what_was_held(engine: Any) -> None:
    """The cancel arrives right after the 5th frame went out: the engine sees it after the next
    token and sends the frame it was holding before `done`."""
    engine, daemon_side = engine
    frames_sent = []
    send = engine.send

    def send_and_cancel_after_five(message: dict[str, Any]) -> None:
        send(message)
        if message["ev"] == "tok":
            frames_sent.append(message)
            if len(frames_sent) == 5:
                daemon_side.send(msgpack.packb({"op": "cancel", "request": "r1"}))

    engine.send = send_and_cancel_after_five
    generate(engine, 900)
    messages = received(daemon_side)
    toks, done = messages[:-1], messages[-1]
    assert done["ev"] == "done" and done["finish_reason"] == "cancelled"
    assert all(m["ev"] == "tok" for m in toks)
    tokens_when_cancelled = sum(len(m["t"]) for m in frames_sent[:5])
    # At most the token in progress came after the cancel (tokens without text are not in a frame).
    assert tokens_when_cancelled <= sum(len(m["t"]) for m in toks) <= tokens_when_cancelled + 1
    assert done["stats"]["tokens_after_cancel"] == 0  # the engine's cancel point, not a count that grows with speed


# --- through the daemon ------------------------------------------------------------------------


async def follow(client: Client, request_id: str) -> dict[str, Any]:
    """Every `tok` event of one reply as `client` receives it, and its final message."""
    events: list[dict[str, Any]] = []
    async for event in client.raw_events():
        if event.topic == "tok" and event.body["request"] == request_id:
            events.append(event.body)
        elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
            return {"events": events, "final": event.body}
    raise AssertionError("the event stream ended")


async def test_four_clients_each_receive_every_token_of_a_fast_reply_in_order(tiny_daemon: DaemonProcess) -> None:
    clients = [Client(tiny_daemon.runtime_dir, name=f"client-{i}") for i in range(4)]
    for client in clients:
        await client.connect()
        await client.subscribe()
    try:
        await wait_ready(clients[0])
        request_id = uuid.uuid4().hex
        followers = [asyncio.create_task(follow(c, request_id)) for c in clients]
        await clients[0].request(
            "chat", {"content": "hello", "sampling": {"temperature": 0.0, "max_tokens": 2000}}, request_id=request_id
        )
        results = await asyncio.gather(*followers)
        stored = (await clients[0].request("conversation.get", {"id": results[0]["final"]["conversation_id"]}))["messages"][-1]
    finally:
        for client in clients:
            await client.close()
    assert stored["status"] == "complete" and stored["stats"]["generated_tokens"] == 2000
    first = results[0]["events"]
    for result in results:
        events = result["events"]
        assert events == first, "every client receives the same events"
        index = 0
        for body in events:
            assert body["index"] == index, "no token missing, none twice, in order"
            assert body["count"] == len(body["t_tokens"]) >= 1 and body["t_engine"] == body["t_tokens"][0]
            index += body["count"]
        assert "".join(body["text"] for body in events) == stored["content"]
        assert index <= 2000
    assert any(body["count"] > 1 for body in first), "a 2,000-token reply of the tiny model is coalesced"
    assert len(first) < index


async def test_a_late_joiners_snapshot_plus_events_equals_the_stored_reply_token_for_token(
    big_context_daemon: DaemonProcess,
) -> None:
    """The engine is paused from the reply's 20th token until the late client has its snapshot, so
    the reply is in flight then; the snapshot's `tokens` is where the events after it start. The
    reply is UNBOUNDED and ends when the test cancels it, 20 tokens after the snapshot: at no speed
    can it end before either."""
    async with Client(big_context_daemon.runtime_dir) as first, Client(big_context_daemon.runtime_dir) as late:
        engine_pid = (await wait_ready(first))["engine_pid"]
        _, request_id, accepted, _ = await start_long_reply(first, 20)
        stream = late.stream()
        with paused(engine_pid):
            snapshot = await anext(stream)
        assert isinstance(snapshot, Snapshot)
        in_flight = snapshot.body["in_flight"]
        assert in_flight is not None and in_flight["request"] == request_id
        text, index = in_flight["text"], in_flight["tokens"]
        assert text and index >= 20
        cancel_at, cancelled = index + 20, False
        async for event in stream:
            assert isinstance(event, Event), "no resync expected"
            if event.topic == "tok" and event.body["request"] == request_id:
                assert event.body["index"] == index
                text += event.body["text"]
                index += event.body["count"]
                if index >= cancel_at and not cancelled:
                    assert (await first.request("cancel", {"request": request_id})) == {"cancelled": "running"}
                    cancelled = True
            elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
                break
        reply = (await first.request("conversation.get", {"id": accepted["conversation"]}))["messages"][-1]
        assert reply["status"] == "cancelled" and reply["content"] == text


async def test_cancel_through_the_daemon_keeps_every_token_it_sent(big_context_daemon: DaemonProcess) -> None:
    async with Client(big_context_daemon.runtime_dir) as client:
        events, request_id, accepted, texts = await start_long_reply(client, 50)  # UNBOUNDED: still running
        assert (await client.request("cancel", {"request": request_id})) == {"cancelled": "running"}
        async for event in events:
            if event.topic == "tok" and event.body["request"] == request_id:
                texts.append(event.body["text"])
            elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
                assert event.body["status"] == "cancelled"
                break
        stored = (await client.request("conversation.get", {"id": accepted["conversation"]}))["messages"][-1]
        assert stored["status"] == "cancelled" and stored["content"] == "".join(texts)
        assert stored["stats"]["tokens_after_cancel"] == 0  # the engine's cancel point, whatever the speed
