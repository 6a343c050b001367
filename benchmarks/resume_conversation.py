"""Time to first token when going back to a ~1,500-token conversation after another one ran.

Cold: a daemon with the conversation state cache off (state_cache_mib = 0), so the engine
re-evaluates the whole history. Cached: the default cache, which restores the KV state.
Target: cached at least 5 times faster.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import daemon, demo_model
from vramchat.shared.client import Client

# About 1,500 tokens of history with the demo model's tokenizer.
LONG_MESSAGE = "Here are my notes on the history of European cities. " + " ".join(
    f"Note {i}: the old town square had a market, a church and a fountain." for i in range(90)
)


async def _ask(client: Client, events: Any, content: str, conversation: str | None) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    body: dict[str, Any] = {"content": content, "sampling": {"max_tokens": 16, "temperature": 0.0}}
    if conversation:
        body["conversation"] = conversation
    await client.request("chat", body, request_id=request_id)
    async for event in events:
        if event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
            return event.body
    raise RuntimeError("event stream ended")


async def _measure(runtime_dir: Path, rounds: int) -> list[dict[str, Any]]:
    async with Client(runtime_dir, timeout=120) as client:
        while (await client.request("status"))["model"]["state"] != "ready":
            await asyncio.sleep(0.1)
        await client.subscribe()
        events = client.raw_events()
        results = []
        for _ in range(rounds):
            first = await _ask(client, events, LONG_MESSAGE, None)
            await _ask(client, events, LONG_MESSAGE.replace("notes", "thoughts"), None)  # takes the context
            resumed = await _ask(client, events, "Which note mentions a fountain?", first["conversation_id"])
            results.append({"history_tokens": first["stats"]["prompt_tokens"], **resumed["stats"]})
        return results


def _run_daemon(cache_mib: int, rounds: int) -> list[dict[str, Any]]:
    with daemon("--model", str(demo_model()), config=f"state_cache_mib = {cache_mib}\n") as d:
        return asyncio.run(_measure(d.runtime_dir, rounds))


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    cold = _run_daemon(0, rounds)
    cached = _run_daemon(512, rounds)
    cold_ttft = statistics.median(r["ttft_s"] for r in cold)
    cached_ttft = statistics.median(r["ttft_s"] for r in cached)
    return {
        "name": "resume a conversation",
        "model": demo_model().name,
        "history_tokens": cold[0]["history_tokens"],
        "cold_ttft_ms": cold_ttft * 1000,
        "cached_ttft_ms": cached_ttft * 1000,
        "cold_prompt_tokens_evaluated": cold[0]["prompt_tokens"] - cold[0]["prompt_cached_tokens"],
        "cached_prompt_tokens_evaluated": cached[0]["prompt_tokens"] - cached[0]["prompt_cached_tokens"],
        "speedup": cold_ttft / cached_ttft,
        "target": "speedup >= 5",
        "met": cold_ttft / cached_ttft >= 5,
        "rounds": rounds,
        "threads": os.cpu_count(),
    }


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
