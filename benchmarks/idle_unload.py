"""Idle unload (keep_alive): what an unloaded model gives back, and what the next request pays.

The daemon serves the demo model with `--keep-alive 1s`. Each round asks one question on the warm
model, waits for keep_alive to unload it, measures what the engine held and how much anonymous
memory the machine has fewer afterwards, then asks again: that first token includes starting an engine and loading the model. Also
the cost of one `/metrics` scrape, which a monitoring system makes every few seconds forever.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import chat_and_collect, daemon, demo_model, loadavg, median, wait_ready
from vramchat.shared.client import Client

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from helpers import free_port


async def until_unloaded(client: Client, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        model: dict[str, Any] = (await client.request("status"))["model"]
        if model["state"] == "unloaded":
            return model
        if time.monotonic() > deadline:
            raise RuntimeError(f"keep_alive did not unload the model: {model['state']}")
        await asyncio.sleep(0.05)


def rss_anon(pid: int) -> int:
    """The engine's anonymous resident memory (weights repacked, KV, compute): what goes back to the
    machine when it exits; its file-backed pages stay as page cache, which was available already."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def anon_pages() -> int:
    """The machine's anonymous memory (/proc/meminfo AnonPages). MemAvailable is no measure here: on
    this VM it rose by a third to two thirds of what the exiting engine freed."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("AnonPages:"):
            return int(line.split()[1]) * 1024
    return 0


def engine_alive(engine: psutil.Process) -> bool:
    try:
        return engine.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 5
    port = free_port()
    warm: list[float] = []
    after_unload: list[float] = []
    engine_rss: list[int] = []
    engine_anon: list[int] = []
    given_back: list[int] = []
    scrapes: list[float] = []

    async def measure(bench_root: Path) -> None:
        async with Client(bench_root / "run", timeout=120) as client:
            await client.subscribe()
            events = client.raw_events()
            for _ in range(rounds):
                await wait_ready(client)
                result = await chat_and_collect(client, events, 1, content="Hi")
                warm.append(result["received"][0] - result["started"])
                engine = psutil.Process((await client.request("status"))["model"]["engine_pid"])
                memory = engine.memory_info()
                anon = rss_anon(engine.pid)
                anon_before = anon_pages()
                await until_unloaded(client)
                while engine_alive(engine):
                    await asyncio.sleep(0.02)
                engine_rss.append(memory.rss)
                engine_anon.append(anon)
                given_back.append(anon_before - anon_pages())
                result = await chat_and_collect(client, events, 1, content="Hi")
                after_unload.append(result["received"][0] - result["started"])

    with daemon("--model", str(demo_model()), "--keep-alive", "1s", "--http", f"127.0.0.1:{port}") as bench:
        asyncio.run(measure(bench.root))
        key = (bench.root / "data" / "api-key").read_text().strip()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {key}"})
        for _ in range(5 if quick else 50):
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
            scrapes.append(time.perf_counter() - started)
    return {
        "name": "idle unload and metrics",
        "settings": {"model": demo_model().name, "keep_alive": "1s", "rounds": rounds, "scrapes": len(scrapes)},
        "engine_rss_mib": median([float(n) for n in engine_rss]) / 2**20,
        "engine_anonymous_mib": median([float(n) for n in engine_anon]) / 2**20,
        "machine_anonymous_freed_mib": median([float(n) for n in given_back]) / 2**20,
        "warm_first_token_ms": 1000 * median(warm),
        "first_token_after_unload_ms": 1000 * median(after_unload),
        "metrics_scrape_ms": 1000 * median(scrapes),
        "load_average_after": loadavg(),
        "targets": [],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
