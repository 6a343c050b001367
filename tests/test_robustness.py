"""Thousands of bad frames, and 200 queued requests from 8 clients, against a real daemon."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import psutil
import pytest
import zmq
import zmq.asyncio

from vramchat.daemon import transport
from vramchat.shared import protocol
from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.protocol import CONTROL_SOCKET

from helpers import UNBOUNDED, DaemonProcess, chat, collect_reply, paused, wait_ready, wait_running

WRONG_TYPES: list[Any] = [None, True, -1, 2**63, 3.5, "", "x" * 300, b"\x00\xff", [], [1, "a"], {}, {"nested": {"deep": [None]}}]
# Fields each request reads, with the kind each must be: the fuzzer sends any other kind.
READS: dict[str, dict[str, type]] = {
    "hello": {"protocol": int},
    "load": {"model": str, "n_gpu_layers": int, "n_ctx": int, "n_threads": int},
    "chat": {"content": str, "conversation": str, "sampling": dict},
    "regenerate": {"conversation": str, "message": str},
    "edit": {"conversation": str, "message": str, "content": str, "sampling": dict},
    "conversation.switch": {"conversation": str, "message": str},
    "conversation.search": {"text": str, "limit": int},
    "cancel": {"request": str},
    "conversation.get": {"id": str},
    "conversation.delete": {"id": str},
}


def random_object(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return rng.randint(-(2**40), 2**40)
    if choice == 1:
        return rng.random()
    if choice == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(20)))
    if choice == 3:
        return rng.randbytes(rng.randrange(20))
    if choice == 4:
        return rng.choice([None, True, False])
    if choice == 5:
        return [random_object(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(random_object(rng, depth + 1))[:10]: random_object(rng, depth + 1) for _ in range(rng.randrange(4))}


def bad_frames(rng: random.Random, count: int) -> list[list[bytes]]:
    """Random bytes, truncated requests, random msgpack, and envelopes with wrong field types."""
    frames: list[list[bytes]] = []
    types = sorted(protocol.REQUEST_TYPES)
    while len(frames) < count:
        kind = rng.randrange(6)
        if kind == 0:
            frames.append([rng.randbytes(rng.randrange(1, 200))])
        elif kind == 1:
            whole = msgpack.packb({"v": 1, "id": "t", "type": rng.choice(types), "body": {"content": "hello there"}})
            frames.append([whole[: rng.randrange(1, len(whole))]])
        elif kind == 2:
            frames.append([msgpack.packb(random_object(rng))])
        elif kind == 3:
            request_type = rng.choice(sorted(READS))
            body = {}
            for name in rng.sample(sorted(READS[request_type]), rng.randrange(1, len(READS[request_type]) + 1)):
                expected = READS[request_type][name]
                body[name] = rng.choice([v for v in WRONG_TYPES if type(v) is not expected])
            frames.append([msgpack.packb({"v": 1, "id": uuid.uuid4().hex, "type": request_type, "body": body})])
        elif kind == 4:
            frames.append([rng.randbytes(8) for _ in range(rng.randrange(2, 4))])
        else:
            frames.append(
                [msgpack.packb({"v": rng.choice(WRONG_TYPES), "id": rng.choice(WRONG_TYPES), "type": rng.choice(types)})]
            )
    return frames


async def send_all(runtime_dir: Path, frames: list[list[bytes]]) -> list[dict[str, Any]]:
    """Send each frame and wait for its reply; a fresh socket every 100 keeps under the rate limit."""
    context = zmq.asyncio.Context.instance()
    replies = []
    for start in range(0, len(frames), 100):
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"ipc://{runtime_dir / CONTROL_SOCKET}")
        for frame in frames[start : start + 100]:
            await dealer.send_multipart(frame)
            replies.append(msgpack.unpackb(await asyncio.wait_for(dealer.recv(), 10), raw=False))
        dealer.close()
    return replies


async def test_fuzzed_frames_all_get_error_replies_and_memory_stays_flat(tiny_daemon: DaemonProcess) -> None:
    rng = random.Random(1234)
    daemon = psutil.Process(tiny_daemon.pid)
    await send_all(tiny_daemon.runtime_dir, bad_frames(rng, 500))  # warm up caches and allocators
    rss_before = daemon.memory_info().rss
    frames = bad_frames(rng, 3000)
    replies = await send_all(tiny_daemon.runtime_dir, frames)
    rss_after = daemon.memory_info().rss

    assert len(replies) == len(frames)
    assert [r for r in replies if r.get("ok") is not False] == []
    codes = {r["error"]["code"] for r in replies if r.get("ok") is False}
    assert codes <= set(protocol.ERROR_CODES) and "internal" not in codes, codes
    assert rss_after - rss_before < 10 * 1024 * 1024, f"RSS grew {(rss_after - rss_before) >> 20} MiB"

    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()
        request_id, _ = await chat(client, "still there?", {"max_tokens": 5})
        _, final = await collect_reply(events, request_id)
        assert final is not None and final["status"] == "complete"


def test_the_rate_limiter_allows_a_burst_then_the_refill_rate_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a made-up clock: what the daemon test below shows on a real one, at any speed."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(transport, "time", SimpleNamespace(monotonic=lambda: clock.now))
    limiter = transport.RateLimiter(burst=5, per_second=4.0)
    assert [limiter.allow(b"a") for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow(b"b"), "each client has its own bucket"
    clock.now += 0.125  # half a request refilled: still none
    assert not limiter.allow(b"a")
    clock.now += 0.125
    assert limiter.allow(b"a") and not limiter.allow(b"a")
    clock.now += 60  # refilled, but never past the burst
    assert [limiter.allow(b"a") for _ in range(6)] == [True] * 5 + [False]


async def test_a_flood_from_one_client_is_rate_limited(tiny_daemon: DaemonProcess) -> None:
    # 400 requests take ~0.07 s here; none would be limited only if they took over 2 s (the burst
    # of 200 plus 100 a second), so a machine 30 times slower still passes.
    async with Client(tiny_daemon.runtime_dir) as client:
        results = await asyncio.gather(*(client.request("status") for _ in range(400)), return_exceptions=True)
    limited = [r for r in results if isinstance(r, Exception)]
    assert limited and all(getattr(r, "code", None) == "rate_limited" for r in limited)
    assert len(results) - len(limited) >= 200


async def test_eight_clients_with_25_queued_requests_each_complete_in_fifo_order(tiny_daemon: DaemonProcess) -> None:
    clients = [Client(tiny_daemon.runtime_dir, name=f"load-{i}") for i in range(8)]
    for client in clients:
        await client.connect()
    watcher = Client(tiny_daemon.runtime_dir, name="watcher")
    await watcher.connect()
    await wait_ready(watcher)
    await watcher.subscribe()
    events = watcher.raw_events()

    async def submit(client: Client) -> list[str]:
        ids = []
        for n in range(25):
            request_id, _ = await chat(client, f"{client.name} #{n}", {"max_tokens": 4, "temperature": 0.0})
            ids.append(request_id)
        return ids

    submitted = await asyncio.gather(*(submit(c) for c in clients))
    all_ids = {request_id for ids in submitted for request_id in ids}
    assert len(all_ids) == 200

    started_order: list[str] = []
    finished: dict[str, list[dict[str, Any]]] = {}
    user_seq: dict[str, int] = {}
    async for event in events:
        if event.topic != "msg":
            continue
        body = event.body
        if body["role"] == "user":
            user_seq[body["conversation_id"]] = event.seq
        elif body.get("request") in all_ids:
            if body["status"] == "generating":
                started_order.append(body["request"])
            else:
                finished.setdefault(body["request"], []).append(body)
                if len(finished) == 200:
                    break
    for client in [*clients, watcher]:
        await client.close()

    assert all(len(replies) == 1 and replies[0]["status"] == "complete" for replies in finished.values())
    assert sorted(started_order) == sorted(all_ids), "each request started exactly once"
    # FIFO: replies start in the order the daemon accepted the requests; within one client that
    # is the order it sent them.
    for ids in submitted:
        positions = [started_order.index(request_id) for request_id in ids]
        assert positions == sorted(positions)
    conversation_of = {r[0]["request"]: r[0]["conversation_id"] for r in finished.values()}
    seqs = [user_seq[conversation_of[request_id]] for request_id in started_order if conversation_of[request_id] in user_seq]
    assert seqs == sorted(seqs)


async def test_one_client_may_queue_32_requests(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        model = await wait_ready(client)
        # The engine is stopped until `first` is cancelled: it runs while the others queue, at any speed.
        with paused(model["engine_pid"]):
            first, _ = await chat(client, "long", UNBOUNDED)
            await wait_running(client, first)
            for n in range(32):
                await chat(client, f"#{n}", {"max_tokens": 1})
            try:
                await chat(client, "one too many", {"max_tokens": 1})
            except RequestFailed as error:
                assert error.code == "queue_full" and "32 requests queued" in error.message
            else:
                raise AssertionError("the 33rd queued request was accepted")
            async with Client(tiny_daemon.runtime_dir) as other:  # the limit is per client
                await chat(other, "mine", {"max_tokens": 1})
            assert (await client.request("cancel", {"request": first})) == {"cancelled": "running"}
