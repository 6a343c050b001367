"""Hostile requests on the control socket (issue 23): Hypothesis builds every request type with
the fields it reads, wrong types and extreme values, against a real daemon and a real engine.

Invariants: every reply is a success or a documented error (never `internal`), `status` answers
throughout, a real chat completes after the run, and nothing stored before it is lost (unless a
request that succeeded deleted it: an edit or a regenerate keeps the earlier version, which a
switch brings back whole).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramchat.shared import protocol
from vramchat.shared.client import Client

from helpers import DaemonFactory, DaemonProcess, chat, collect_reply, wait_ready

EXAMPLES = 300
PAUSE_S = 0.012  # under the rate limit of 100 requests a second per client
DOCUMENTED = set(protocol.ERROR_CODES) - {"internal"}

EXTREMES = st.sampled_from(
    [0, -1, 1, 15, 16, 2**20, 2**20 + 1, 2**31, 2**32, 2**63 - 1, -(2**63), 1e308, float("nan"), float("inf")]
)
TEXT = st.text(max_size=30)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | EXTREMES | TEXT | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=6,
)
SAMPLING = st.fixed_dictionaries({}, optional={name: EXTREMES | VALUES for name in protocol.SAMPLING_FIELDS}) | VALUES
LOAD_VALUES = {
    "model": st.sampled_from(["tiny.gguf", "tiny-gqa.gguf", "../../etc/passwd", "/dev/zero", "nope.gguf", ""]) | VALUES,
    "n_gpu_layers": st.sampled_from(["auto", "all"]) | EXTREMES | VALUES,
    "n_ctx": st.integers(16, 4096) | EXTREMES | VALUES,
    "n_threads": st.integers(1, 2) | EXTREMES | VALUES,
    "vram_budget": st.sampled_from(["1GiB", "RPC0=1GiB", "-5", "CUDA0=x"]) | EXTREMES | VALUES,
    "force": st.booleans() | VALUES,
    "rpc_servers": st.lists(st.sampled_from(["127.0.0.1:1", "x"]), max_size=2) | VALUES,
    "cache_type_k": st.sampled_from(["q8_0", "f16", "auto", "q2_k"]) | VALUES,
    "cache_type_v": st.sampled_from(["q8_0", "f16", "auto"]) | VALUES,
    "flash_attn": st.sampled_from(["on", "off", "auto"]) | VALUES,
    "n_batch": EXTREMES | VALUES,
    "n_ubatch": EXTREMES | VALUES,
    "n_cpu_moe": st.just("all") | EXTREMES | VALUES,
    "split_mode": st.sampled_from(["layer", "none", "row"]) | VALUES,
    "main_gpu": EXTREMES | VALUES,
    "tensor_split": st.lists(EXTREMES, max_size=3) | st.sampled_from(["3,1", "nan", ","]) | VALUES,
    "use_mmap": st.booleans() | VALUES,
    "use_mlock": st.booleans() | VALUES,
}
CONVERSATION_ID = st.sampled_from(["SENTINEL", "", "%", "_", "0"]) | TEXT | VALUES
# FIRST and LAST stand for the sentinel conversation's question and reply.
MESSAGE_ID = st.sampled_from(["FIRST", "LAST", ""]) | TEXT | VALUES
SEARCH_TEXT = st.sampled_from(['"', "*", "AND", "NEAR(", "-x", "remember", 'a "b', "x*"]) | TEXT | VALUES
# The fields each request type reads (docs/protocol.md), with what Hypothesis may put in each.
READS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "hello": {"protocol": st.sampled_from([protocol.PROTOCOL_VERSION]) | EXTREMES | VALUES, "client": VALUES},
    "snapshot": {},
    "status": {},
    "models": {},
    "load": LOAD_VALUES,
    "unload": {},
    "chat": {"content": TEXT | VALUES, "conversation": CONVERSATION_ID, "sampling": SAMPLING},
    "regenerate": {"conversation": CONVERSATION_ID, "message": MESSAGE_ID, "sampling": SAMPLING},
    "edit": {"conversation": CONVERSATION_ID, "message": MESSAGE_ID, "content": TEXT | VALUES, "sampling": SAMPLING},
    "cancel": {"request": TEXT | VALUES},
    "conversation.create": {"title": TEXT | VALUES, "system_prompt": TEXT | VALUES, "settings": SAMPLING},
    "conversation.list": {},
    "conversation.get": {"id": CONVERSATION_ID},
    "conversation.update": {"id": CONVERSATION_ID, "title": TEXT | VALUES, "system_prompt": TEXT | VALUES, "settings": SAMPLING},
    "conversation.delete": {"id": CONVERSATION_ID},
    "conversation.switch": {"conversation": CONVERSATION_ID, "message": MESSAGE_ID},
    "conversation.search": {"text": SEARCH_TEXT, "limit": st.integers(-1, 300) | EXTREMES | VALUES},
    "pull": {
        "repo": st.sampled_from(["owner/name", "a/b/c", "../x", ""]) | TEXT | VALUES,
        "quant": TEXT | VALUES,
        "revision": TEXT | VALUES,
    },
    "pull.cancel": {"id": TEXT | VALUES},
}
assert set(READS) == set(protocol.REQUEST_TYPES), "a request type the fuzzer does not send"
# Loads that pass the door, so that the engine is replaced under the other requests.
VALID_LOAD = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny.gguf", "tiny-gqa.gguf"]), "n_ctx": st.integers(16, 2048)},
    optional={
        "n_threads": st.integers(1, 2),
        "n_gpu_layers": st.sampled_from(["auto", 0, 3]),
        "cache_type_k": st.sampled_from(["q8_0", "f16"]),
        "flash_attn": st.sampled_from(["on", "off", "auto"]),
        "n_batch": st.integers(1, 4096),
        "n_ubatch": st.integers(1, 4096),
        "use_mmap": st.booleans(),
    },
)
# Version changes on a second sentinel's own messages, so that some pass the door; only the
# random fields above may name (and delete) the first one.
ON_SENTINEL = {"conversation": st.just("VERSIONED"), "message": st.sampled_from(["V_FIRST", "V_LAST"])}
VALID_VERSIONS = st.one_of(
    st.tuples(
        st.just("edit"),
        st.fixed_dictionaries({**ON_SENTINEL, "content": TEXT.filter(str.strip)}, optional={"sampling": SAMPLING}),
    ),
    st.tuples(st.just("regenerate"), st.fixed_dictionaries(ON_SENTINEL, optional={"sampling": SAMPLING})),
    st.tuples(st.just("conversation.switch"), st.fixed_dictionaries(ON_SENTINEL)),
)
REQUESTS = st.one_of(
    st.tuples(st.just("load"), VALID_LOAD),
    VALID_VERSIONS,
    *(st.tuples(st.just(kind), st.fixed_dictionaries({}, optional=fields)) for kind, fields in READS.items()),
    st.tuples(TEXT, st.dictionaries(TEXT, VALUES, max_size=3)),  # an unknown type
)


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> DaemonProcess:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a pull is refused at once (`hub`) rather than sent to huggingface.co
    # A small context: a reply that asks for every token it can is still short.
    return daemon_factory("--model", str(models_dir / "tiny.gguf"), "--ctx", "512")


async def sentinels(daemon: DaemonProcess) -> dict[str, list[dict[str, Any]]]:
    """Two conversations of one exchange each: id -> messages."""
    async with Client(daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        events = client.raw_events()
        made = {}
        for _ in range(2):
            request_id, accepted = await chat(client, "remember this", {"max_tokens": 5, "temperature": 0.0})
            await asyncio.wait_for(collect_reply(events, request_id), 60)
            conversation = accepted["conversation"]
            made[conversation] = (await client.request("conversation.get", {"id": conversation}))["messages"]
        return made


def test_hostile_control_requests_get_documented_replies_and_lose_nothing(daemon: DaemonProcess) -> None:
    before = asyncio.run(sentinels(daemon))
    conversation, versioned = before
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 120_000)
    dealer.connect(f"ipc://{daemon.runtime_dir / protocol.CONTROL_SOCKET}")
    deleted: set[str] = set()
    names = {"SENTINEL": conversation, "VERSIONED": versioned}
    names |= {"FIRST": before[conversation][0]["id"], "LAST": before[conversation][-1]["id"]}
    names |= {"V_FIRST": before[versioned][0]["id"], "V_LAST": before[versioned][-1]["id"]}
    seen: dict[str, set[str]] = {}

    def ask(kind: str, body: dict[str, Any]) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        dealer.send(msgpack.packb({"v": 1, "id": request_id, "type": kind, "body": body}))
        while True:  # a late reply to an earlier request (a load) may come first
            reply: dict[str, Any] = msgpack.unpackb(dealer.recv(), raw=False)
            if reply["id"] == request_id:
                return reply

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(REQUESTS)
    def hostile(request: tuple[str, dict[str, Any]]) -> None:
        kind, body = request
        for name in ("conversation", "id", "message"):
            if isinstance(body.get(name), str) and body[name] in names:
                body[name] = names[body[name]]
        reply = ask(kind, body)
        outcome = "ok" if reply["ok"] else reply["error"]["code"]
        seen.setdefault(kind, set()).add(outcome)
        assert reply["ok"] or (reply["error"]["code"] in DOCUMENTED and reply["error"]["message"]), (kind, body, reply)
        if reply["ok"] and kind == "conversation.delete":
            deleted.add(reply["body"]["deleted"])
        assert ask("status", {})["ok"]
        time.sleep(PAUSE_S)

    try:
        hostile()
    finally:
        dealer.close()
        context.term()
    # The run reached past the door: loads, chats and conversation changes that succeeded.
    passed = ("load", "chat", "conversation.create", "status", "edit", "conversation.switch", "conversation.search")
    assert all("ok" in seen.get(kind, ()) for kind in passed), {k: v for k, v in seen.items() if k in READS}

    async def after() -> dict[str, list[dict[str, Any]]]:
        async with Client(daemon.runtime_dir) as client:
            for job in [
                (await client.request("status"))["queue"]["running"],
                *(await client.request("status"))["queue"]["pending"],
            ]:
                if job:
                    await client.request("cancel", {"request": job["request"]})
            await client.request("load", {"model": "tiny.gguf", "n_ctx": 512}, timeout=None)
            await client.subscribe()
            events = client.raw_events()
            request_id, _ = await chat(client, "still there?", {"max_tokens": 5, "temperature": 0.0})
            _, final = await asyncio.wait_for(collect_reply(events, request_id), 60)
            assert final is not None and final["status"] == "complete", final
            # Edits and regenerates kept the earlier versions: each sentinel's branch is still there.
            kept = {}
            for sentinel, messages in before.items():
                if sentinel not in deleted:
                    switch = {"conversation": sentinel, "message": messages[-1]["id"]}
                    kept[sentinel] = (await client.request("conversation.switch", switch))["messages"]
            return kept

    kept = asyncio.run(after())
    for sentinel, messages in kept.items():
        assert [without_versions(m) for m in messages[: len(before[sentinel])]] == [without_versions(m) for m in before[sentinel]]


def without_versions(message: dict[str, Any]) -> dict[str, Any]:
    """A stored message as it was, whatever versions were added beside it since."""
    return {k: v for k, v in message.items() if k != "versions"}


async def test_text_that_is_not_utf8_is_refused_at_the_control_door(daemon: DaemonProcess) -> None:
    frame = msgpack.packb({"v": 1, "id": "bad-text", "type": "chat", "body": {"content": "PLACEHOLDER"}})
    frame = frame.replace(b"PLACEHOLDER", b"\xff\xfe" + b"x" * 9)  # a msgpack string that is not UTF-8
    async with Client(daemon.runtime_dir) as client:
        await wait_ready(client)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    dealer.connect(f"ipc://{daemon.runtime_dir / protocol.CONTROL_SOCKET}")
    try:
        dealer.send(frame)
        reply = msgpack.unpackb(dealer.recv(), raw=False)
    finally:
        dealer.close()
        context.term()
    assert reply["id"] == "bad-text" and reply["ok"] is False, reply
    assert reply["error"]["code"] == "invalid_value" and "not valid UTF-8" in reply["error"]["message"], reply
