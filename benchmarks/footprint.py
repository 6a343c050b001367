"""Daemon footprint: the daemon process's CPU use while idle with the demo model loaded, and
its memory, without the engine child (psutil on the daemon's pid only).

Idle is measured twice: with no client attached (only the telemetry sampler runs, every 0.5 s),
and with one subscribed client (the sampler's `telemetry` events are then also encoded and sent).
No target was set.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import psutil

from benchmarks.common import daemon, loadavg, wait_ready
from vramchat.shared.client import Client
from vramchat.shared.paths import demo_model_path


def run(quick: bool = False) -> dict[str, Any]:
    idle_s = 2.0 if quick else 10.0

    async def measure(d: Any) -> dict[str, Any]:
        async with Client(d.runtime_dir, timeout=120) as client:
            engine_pid = (await wait_ready(client))["engine_pid"]
        process = psutil.Process(d.pid)
        await asyncio.sleep(1.0)  # let the load settle
        process.cpu_percent()
        await asyncio.sleep(idle_s)
        alone = process.cpu_percent()
        async with Client(d.runtime_dir, timeout=120) as client:
            await client.subscribe()
            process.cpu_percent()
            events = client.raw_events()
            received = 0

            async def count() -> None:
                nonlocal received
                async for _ in events:
                    received += 1

            counter = asyncio.create_task(count())
            await asyncio.sleep(idle_s)
            attached = process.cpu_percent()
            counter.cancel()
        memory = process.memory_full_info()
        engine = psutil.Process(engine_pid).memory_info()
        return {"alone": alone, "attached": attached, "events": received, "rss": memory.rss, "uss": memory.uss,
                "threads": process.num_threads(), "engine_rss": engine.rss}

    with daemon("--model", str(demo_model_path())) as d:
        m = asyncio.run(measure(d))
    return {
        "name": "daemon footprint",
        "settings": {"model": demo_model_path().name, "idle_seconds": idle_s, "telemetry_interval_s": 0.5},
        "idle_cpu_percent_of_one_core_no_client": m["alone"],
        "idle_cpu_percent_of_one_core_one_client": m["attached"],
        "events_to_the_client_while_idle": m["events"],
        "daemon_rss_mib": m["rss"] / 1048576,
        "daemon_uss_mib": m["uss"] / 1048576,
        "daemon_threads": m["threads"],
        "engine_rss_mib_for_reference": m["engine_rss"] / 1048576,
        "load_average_after": loadavg(),
        "targets": [],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
