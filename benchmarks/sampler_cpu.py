"""CPU cost of the telemetry sampler at 2 Hz, as a share of one core (target: under 1%).

It samples a real engine that holds the demo model, as the daemon does: the cost of reading an
engine's memory grows with its mappings, so sampling some small process would flatter it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import psutil

from benchmarks.common import daemon, target
from vramchat.daemon.telemetry import TelemetrySampler
from vramchat.shared.paths import demo_model_path


def run(quick: bool = False) -> dict[str, Any]:
    duration = 3.0 if quick else 20.0
    with daemon("--model", str(demo_model_path())) as running:
        deadline = time.monotonic() + 60
        engines: list[psutil.Process] = []
        while not engines and time.monotonic() < deadline:
            engines = [c for c in psutil.Process(running.pid).children() if "vramchat.daemon.engine" in " ".join(c.cmdline())]
            time.sleep(0.1)
        if not engines:
            raise RuntimeError("the daemon started no engine")
        sampler = TelemetrySampler()
        cpu_before, wall_before = time.process_time(), time.monotonic()
        samples = 0
        while time.monotonic() - wall_before < duration:
            sampler.sample(engine_pid=engines[0].pid)
            samples += 1
            time.sleep(0.5)
        cpu = time.process_time() - cpu_before
        wall = time.monotonic() - wall_before
    percent = 100 * cpu / wall
    return {
        "name": "telemetry sampler CPU at 2 Hz",
        "settings": {"samples": samples, "engine holding": demo_model_path().name},
        "cpu_ms_per_sample": 1000 * cpu / samples,
        "percent_of_one_core": percent,
        "targets": [target("percent_of_one_core", "< 1% of one core", percent < 1.0,
                           "the engine's smaps walk (~4.5 ms) dominates; walk it less often")],
    }


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
