"""Streaming through the daemon against llama-cpp-python in-process, on the demo model.

- overhead: generated tok/s as one attached client receives them, against the same model,
  messages, sampling (greedy) and generation loop run in this process. Target: ratio >= 0.99.
- time to first token, daemon against direct. Target: within 5 ms.
- relay latency: from the engine producing a token (its `t_engine` stamp) to a client receiving
  it, p50 and p99, over ipc and over TCP. Target: p99 under 1 ms on ipc.
- fan-out: 1, 4 and 16 subscribers (SUB sockets in one asyncio process), tok/s and whether each
  received every token. Target: 16 clients at >= 0.98 of 1 client.
The direct and daemon runs alternate, so both see the same machine load.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import socket
import statistics
import sys
import time
import uuid
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from benchmarks.common import daemon, percentile
from vramchat.daemon.models import DEMO_DEFAULTS
from vramchat.shared.client import Client
from vramchat.shared.paths import demo_model_path

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MESSAGES = [{"role": "system", "content": DEMO_DEFAULTS["system_prompt"]}, {"role": "user", "content": PROMPT}]


def direct_run(llm: Any, formatter: Any, max_tokens: int) -> dict[str, Any]:
    """The engine's generation loop, in-process, with no daemon."""
    formatted = formatter(messages=MESSAGES)
    started = time.perf_counter()
    prompt = llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
    llm.set_seed(1)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    times = []
    for token in llm.generate(prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        utf8.decode(llm._model.detokenize([token]))
        times.append(time.perf_counter())
        if len(times) >= max_tokens:
            break
    return {"ttft": times[0] - started, "tokens": len(times), "tok_s": (len(times) - 1) / (times[-1] - times[0])}


async def daemon_run(client: Client, events: Any, max_tokens: int) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    started = time.perf_counter()
    await client.request("chat", {"content": PROMPT, "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "seed": 1}},
                         request_id=request_id)
    times, latencies = [], []
    async for event in events:
        if event.topic == "tok" and event.body["request"] == request_id:
            times.append(time.perf_counter())
            latencies.append(time.time() - event.body["t_engine"])
        elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
            return {"ttft": times[0] - started, "tokens": event.body["stats"]["generated_tokens"],
                    "tok_s": (len(times) - 1) / (times[-1] - times[0]), "latencies": latencies}
    raise RuntimeError("event stream ended")


def overhead_and_ttft(runs: int, max_tokens: int) -> dict[str, Any]:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model = str(demo_model_path())
    llm = Llama(model, n_ctx=4096, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False)  # as the engine
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], llm._model.token_get_text(llm.token_eos()),
                                    llm._model.token_get_text(llm.token_bos()))
    direct, through = [], []

    async def measure(runtime_dir: Any) -> None:
        async with Client(runtime_dir, timeout=60) as client:
            while (await client.request("status"))["model"]["state"] != "ready":
                await asyncio.sleep(0.1)
            await client.subscribe()
            events = client.raw_events()
            await daemon_run(client, events, 8)  # warm up
            direct_run(llm, formatter, 8)
            for _ in range(runs):
                direct.append(direct_run(llm, formatter, max_tokens))
                through.append(await daemon_run(client, events, max_tokens))

    with daemon("--model", model) as d:
        asyncio.run(measure(d.runtime_dir))
    ratio = statistics.median(t["tok_s"] for t in through) / statistics.median(d["tok_s"] for d in direct)
    ttft_delta_ms = 1000 * (statistics.median(t["ttft"] for t in through) - statistics.median(d["ttft"] for d in direct))
    latencies = [x for t in through for x in t["latencies"]]
    return {
        "tokens_per_run": f"{through[0]['tokens']} through the daemon, {direct[0]['tokens']} direct",
        "direct_tok_s": statistics.median(d["tok_s"] for d in direct),
        "daemon_tok_s": statistics.median(t["tok_s"] for t in through),
        "overhead_ratio": ratio,
        "direct_ttft_ms": 1000 * statistics.median(d["ttft"] for d in direct),
        "daemon_ttft_ms": 1000 * statistics.median(t["ttft"] for t in through),
        "ttft_delta_ms": ttft_delta_ms,
        "ipc_latency_p50_ms": 1000 * percentile(latencies, 0.5),
        "ipc_latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "targets": "ratio >= 0.99; TTFT within 5 ms; ipc p99 < 1 ms",
        "met": ratio >= 0.99 and abs(ttft_delta_ms) <= 5 and percentile(latencies, 0.99) < 0.001,
    }


def tcp_latency(max_tokens: int) -> dict[str, Any]:
    """Relay latency to a plain-TCP subscriber on loopback (--insecure-tcp, benchmarks only)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def measure(runtime_dir: Any) -> list[float]:
        context = zmq.asyncio.Context.instance()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"tok")
        sub.connect(f"tcp://127.0.0.1:{port + 1}")
        async with Client(runtime_dir, timeout=60) as client:
            while (await client.request("status"))["model"]["state"] != "ready":
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # let the TCP subscription arrive
            await client.request("chat", {"content": PROMPT, "sampling": {"temperature": 0.0, "max_tokens": max_tokens}})
            latencies = []
            while len(latencies) < max_tokens - 5:
                frames = await asyncio.wait_for(sub.recv_multipart(), 30)
                latencies.append(time.time() - msgpack.unpackb(frames[1])["body"]["t_engine"])
        sub.close()
        return latencies

    with daemon("--model", str(demo_model_path()), "--tcp", f"127.0.0.1:{port}", "--insecure-tcp") as d:
        latencies = asyncio.run(measure(d.runtime_dir))
    return {"tcp_latency_p50_ms": 1000 * percentile(latencies, 0.5), "tcp_latency_p99_ms": 1000 * percentile(latencies, 0.99)}


def fan_out(max_tokens: int) -> dict[str, Any]:
    async def measure(runtime_dir: Any, subscribers: int) -> dict[str, Any]:
        clients = [Client(runtime_dir, timeout=60) for _ in range(subscribers)]
        for client in clients:
            await client.connect()
            await client.subscribe()
        while (await clients[0].request("status"))["model"]["state"] != "ready":
            await asyncio.sleep(0.1)
        request_id = uuid.uuid4().hex

        async def receive(client: Client) -> tuple[int, float]:
            times = []
            async for event in client.raw_events():
                if event.topic == "tok" and event.body["request"] == request_id:
                    times.append(time.perf_counter())
                elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
                    return len(times), (len(times) - 1) / (times[-1] - times[0])
            raise RuntimeError("event stream ended")

        receivers = [asyncio.create_task(receive(c)) for c in clients]
        await clients[0].request("chat", {"content": PROMPT, "sampling": {"temperature": 0.0, "max_tokens": max_tokens}},
                                 request_id=request_id)
        results = await asyncio.gather(*receivers)
        for client in clients:
            await client.close()
        counts = {count for count, _ in results}
        return {"tok_s": statistics.median(rate for _, rate in results), "complete": len(counts) == 1}

    figures: dict[str, Any] = {}
    with daemon("--model", str(demo_model_path())) as d:
        for n in (1, 4, 16):
            result = asyncio.run(measure(d.runtime_dir, n))
            figures[f"fanout_{n}_tok_s"] = result["tok_s"]
            figures[f"fanout_{n}_every_client_got_every_token"] = result["complete"]
    figures["fanout_16_vs_1"] = figures["fanout_16_tok_s"] / figures["fanout_1_tok_s"]
    figures["fanout_target"] = "16 clients >= 0.98 of 1"
    figures["fanout_met"] = figures["fanout_16_vs_1"] >= 0.98 and figures["fanout_16_every_client_got_every_token"]
    return figures


def run(quick: bool = False) -> dict[str, Any]:
    runs, tokens = (1, 32) if quick else (7, 200)
    return {"name": "streaming through the daemon", "model": demo_model_path().name,
            **overhead_and_ttft(runs, tokens), **tcp_latency(tokens), **fan_out(tokens)}


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
