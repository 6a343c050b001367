"""Model switch time, and what the daemon itself costs when idle.

- model switch: from a `load` request to the first token of the new model, against building the
  same Llama() in-process and generating its first token.
- footprint: the daemon's CPU use over an idle period, and its RSS without the engine.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import daemon
from vramchat.shared.client import Client
from vramchat.shared.paths import demo_model_path


async def switch_once(client: Client, events: Any, model: str) -> float:
    started = time.perf_counter()
    await client.request("load", {"model": model}, timeout=120)
    request_id = uuid.uuid4().hex
    await client.request("chat", {"content": "Hi", "sampling": {"max_tokens": 1}}, request_id=request_id)
    async for event in events:
        if event.body.get("request") == request_id and event.topic in ("tok", "msg"):
            return time.perf_counter() - started
    raise RuntimeError("event stream ended")


def direct_switch(model: str) -> float:
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model, n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
    next(iter(llm.generate(llm.tokenize(b"Hi"), temp=0.0)))
    elapsed = time.perf_counter() - started
    del llm
    return elapsed


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 5
    demo = str(demo_model_path())
    idle_s = 2.0 if quick else 10.0

    async def measure(runtime_dir: Path, pid: int) -> dict[str, Any]:
        async with Client(runtime_dir, timeout=120) as client:
            while (await client.request("status"))["model"]["state"] != "ready":
                await asyncio.sleep(0.1)
            await client.subscribe()
            events = client.raw_events()
            switches = [await switch_once(client, events, demo) for _ in range(rounds)]
        process = psutil.Process(pid)
        process.cpu_percent()
        await asyncio.sleep(idle_s)  # no client attached: only the telemetry sampler runs
        return {"switches": switches, "idle_cpu_percent": process.cpu_percent(), "rss": process.memory_info().rss}

    with daemon("--model", demo) as d:
        measured = asyncio.run(measure(d.runtime_dir, d.process.pid))
    direct = [direct_switch(demo) for _ in range(rounds)]
    return {
        "name": "model switch and daemon footprint",
        "model": demo_model_path().name,
        "switch_to_first_token_ms": 1000 * statistics.median(measured["switches"]),
        "direct_llama_to_first_token_ms": 1000 * statistics.median(direct),
        "daemon_idle_cpu_percent_of_one_core": measured["idle_cpu_percent"],
        "daemon_rss_mib_without_engine": measured["rss"] / 1048576,
        "target": "none set; switch includes stopping the old engine and starting a Python process",
    }


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
