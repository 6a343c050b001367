"""Fan-out: 1, 4 and 16 attached clients following one reply, demo model.

The clients are `vramchat.shared.client.Client` objects (a DEALER and a SUB each) in ONE asyncio
process, each with its own receive task. That costs far less CPU than 16 Python processes, which
on a 2-core machine would mostly measure the scheduler; the daemon's side (16 subscriptions on
its XPUB) is the same either way. For each client: tok/s from its own receive stamps of the first
and last token, and completeness: it got every token once, in order (each event's `index` is the
previous one's plus its `count`), and its text equals the stored reply. Rounds cycle 1, 4, 16 so
each count sees the same load; medians over rounds.
Also: the engine's own tok/s, the CPU the daemon and the client process spend per token, and
1 against 16 clients again with the engine on one thread, so that a core is left to them.
Target: 16 clients >= 0.98 of 1 client's tok/s, every client complete.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import Any

from benchmarks.common import PROMPT, cpu_seconds, daemon, demo_model, loadavg, median, rate, target, wait_ready
from vramchat.shared.client import Client

COUNTS = (1, 4, 16)


async def one_round(runtime_dir: Any, daemon_pid: int, subscribers: int, max_tokens: int) -> dict[str, Any]:
    clients = [Client(runtime_dir, timeout=120, name=f"bench-{i}") for i in range(subscribers)]
    for client in clients:
        await client.connect()
        await client.subscribe()
    request_id = uuid.uuid4().hex

    async def receive(client: Client) -> dict[str, Any]:
        stamps: list[float] = []  # one per token
        in_order = True
        texts: list[str] = []
        async for event in client.raw_events():
            if event.topic == "tok" and event.body["request"] == request_id:
                in_order = in_order and event.body["index"] == len(stamps)
                stamps += [time.perf_counter()] * event.body["count"]
                texts.append(event.body["text"])
            elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
                return {
                    "stamps": stamps,
                    "events": len(texts),
                    "complete": in_order and "".join(texts) == event.body["content"],
                    "stats": event.body.get("stats") or {},
                }
        raise RuntimeError("the event stream ended")

    receivers = [asyncio.create_task(receive(c)) for c in clients]
    cpu_daemon, cpu_client = cpu_seconds(daemon_pid), time.process_time()
    await clients[0].request(
        "chat", {"content": PROMPT, "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "seed": 1}}, request_id=request_id
    )
    results = await asyncio.gather(*receivers)
    cpu_daemon, cpu_client = cpu_seconds(daemon_pid) - cpu_daemon, time.process_time() - cpu_client
    for client in clients:
        await client.close()
    tokens = len(results[0]["stamps"])
    return {
        "tok_s": median([rate(r["stamps"]) for r in results]),
        "slowest_tok_s": min(rate(r["stamps"]) for r in results),
        "complete": all(r["complete"] and len(r["stamps"]) == tokens for r in results),
        "tokens": tokens,
        "events": results[0]["events"],
        "engine_tok_s": results[0]["stats"]["tokens_per_s"],
        "daemon_cpu_ms_per_token": 1000 * cpu_daemon / max(1, tokens),
        "client_cpu_ms_per_token": 1000 * cpu_client / max(1, tokens),
    }


def measure(
    model: str, counts: tuple[int, ...], rounds: int, max_tokens: int, *daemon_args: str
) -> dict[int, list[dict[str, Any]]]:
    """Rounds cycling through `counts` on one daemon."""
    measured: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}

    async def rounds_on(d: Any) -> None:
        async with Client(d.runtime_dir, timeout=120) as client:
            await wait_ready(client)
        await one_round(d.runtime_dir, d.pid, 1, 16)  # warm up
        for _ in range(rounds):
            for n in counts:
                measured[n].append(await one_round(d.runtime_dir, d.pid, n, max_tokens))

    with daemon("--model", model, *daemon_args) as d:
        asyncio.run(rounds_on(d))
    return measured


def run(quick: bool = False) -> dict[str, Any]:
    rounds, max_tokens = (1, 32) if quick else (4, 200)
    model = str(demo_model())
    measured = measure(model, COUNTS, rounds, max_tokens)
    # The same with the engine on one thread, leaving a core to the daemon and the clients: what
    # 16 clients cost generation when their CPU is not taken from a llama thread.
    spare_core = measure(model, (1, 16), rounds, max_tokens, "--threads", "1")
    result: dict[str, Any] = {
        "name": "fan-out",
        "settings": {
            "model": demo_model().name,
            "rounds": rounds,
            "max_tokens": max_tokens,
            "clients": "Client objects (DEALER + SUB each) in one asyncio process, over ipc",
        },
    }
    for n in COUNTS:
        rows = measured[n]
        result[f"clients_{n}_tok_s"] = median([r["tok_s"] for r in rows])
        result[f"clients_{n}_slowest_client_tok_s"] = median([r["slowest_tok_s"] for r in rows])
        result[f"clients_{n}_engine_tok_s"] = median([r["engine_tok_s"] for r in rows])
        result[f"clients_{n}_every_client_got_every_token"] = all(r["complete"] for r in rows)
        result[f"clients_{n}_daemon_cpu_ms_per_token"] = median([r["daemon_cpu_ms_per_token"] for r in rows])
        result[f"clients_{n}_client_process_cpu_ms_per_token"] = median([r["client_cpu_ms_per_token"] for r in rows])
    result["tokens_per_run"] = sorted({r["tokens"] for rows in measured.values() for r in rows})
    result["tok_events_per_run"] = median([r["events"] for rows in measured.values() for r in rows])
    ratio = result["clients_16_tok_s"] / result["clients_1_tok_s"]
    engine_ratio = result["clients_16_engine_tok_s"] / result["clients_1_engine_tok_s"]
    result["ratio_16_vs_1"] = ratio
    result["engine_ratio_16_vs_1"] = engine_ratio
    spare_ratio = median([r["tok_s"] for r in spare_core[16]]) / median([r["tok_s"] for r in spare_core[1]])
    result["one_engine_thread_ratio_16_vs_1"] = spare_ratio
    result["one_engine_thread_every_client_got_every_token"] = all(r["complete"] for rows in spare_core.values() for r in rows)
    result["load_average_after"] = loadavg()
    why = (
        f"the engine itself slowed to {engine_ratio:.3f} of its 1-client rate: with 16 clients, each receiving "
        f"{result['tok_events_per_run']:.0f} events for {result['tokens_per_run'][-1]} tokens, the client process spent "
        f"{result['clients_16_client_process_cpu_ms_per_token']:.2f} ms and the daemon "
        f"{result['clients_16_daemon_cpu_ms_per_token']:.2f} ms of CPU per token (1 client: "
        f"{result['clients_1_client_process_cpu_ms_per_token']:.2f} and {result['clients_1_daemon_cpu_ms_per_token']:.2f} ms), "
        "CPU taken from the engine's llama threads on a machine with no spare core; with the engine on one "
        f"thread, leaving that core to the daemon and the clients, 16 clients ran at {spare_ratio:.3f} of 1"
    )
    result["targets"] = [
        target("ratio_16_vs_1", ">= 0.98", ratio >= 0.98, why),
        target(
            "clients_16_every_client_got_every_token",
            "every client, every token",
            result["clients_16_every_client_got_every_token"],
            "a client missed or reordered tokens",
        ),
    ]
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
