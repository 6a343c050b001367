"""A conversation longer than the context window: the demo model at n_ctx 512, 30 turns of
replies up to 60 tokens (greedy). Once the conversation outgrows the window, its oldest turns
leave the model's view, enough at once to halve it, so that the next turns extend the same
prompt and reuse its KV cache. Target (issue 16): the median time to first token over the last
10 turns at most twice that of the first 3.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from typing import Any

from benchmarks.common import daemon, demo_model, loadavg, target, wait_ready
from vramchat.shared.client import Client

TURNS, REPLY_TOKENS, N_CTX = 30, 60, 512


async def conversation(runtime_dir: Any, turns: int) -> list[dict[str, Any]]:
    async with Client(runtime_dir, timeout=120) as client:
        await wait_ready(client)
        settings = {"max_tokens": REPLY_TOKENS, "temperature": 0.0}
        conversation_id = (await client.request("conversation.create", {"settings": settings}))["conversation"]["id"]
        await client.subscribe()
        events = client.raw_events()
        replies = []
        for turn in range(turns):
            request_id = f"turn-{turn}"
            body = {"content": f"Tell me one fact about the number {turn + 1}.", "conversation": conversation_id}
            await client.request("chat", body, request_id=request_id)
            async for event in events:
                body = event.body
                if event.topic == "msg" and body.get("request") == request_id and body["status"] != "generating":
                    replies.append(body)
                    break
        return replies


def run(quick: bool = False) -> dict[str, Any]:
    turns = 14 if quick else TURNS
    with daemon("--model", str(demo_model()), "--ctx", str(N_CTX)) as d:
        replies = asyncio.run(conversation(d.runtime_dir, turns))
    stats = [r["stats"] or {} for r in replies]
    ttft_ms = [1000 * (s.get("ttft_s") or 0) for s in stats]
    evaluated = [(s.get("prompt_tokens") or 0) - (s.get("prompt_cached_tokens") or 0) for s in stats]
    first, last = statistics.median(ttft_ms[:3]), statistics.median(ttft_ms[-10:])
    views = [s.get("context") or {} for s in stats]
    drops = sum(1 for before, after in itertools.pairwise(views) if after != before)
    ratio = last / first
    return {
        "name": "Long conversation: 30 turns at n_ctx 512",
        "settings": {
            "model": demo_model().name,
            "turns": turns,
            "reply_tokens": REPLY_TOKENS,
            "n_ctx": N_CTX,
            "loadavg": loadavg(),
        },
        "completed_turns": sum(1 for r in replies if r["status"] == "complete"),
        "ttft_first_3_median_ms": first,
        "ttft_last_10_median_ms": last,
        "ttft_ratio": ratio,
        "evaluated_tokens_first_3_median": statistics.median(evaluated[:3]),
        "evaluated_tokens_last_10_median": statistics.median(evaluated[-10:]),
        "times_the_view_moved": drops,
        "messages_outside_the_view_at_the_end": views[-1].get("dropped", 0),
        "targets": [
            target(
                "ttft_ratio",
                "<= 2",
                ratio <= 2,
                f"the last 10 turns evaluated a median of {statistics.median(evaluated[-10:]):.0f} prompt tokens against "
                f"{statistics.median(evaluated[:3]):.0f} for the first 3; the view moved {drops} times, and each move "
                "re-evaluates half the window",
            )
        ],
    }
