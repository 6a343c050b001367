"""CPU cost of the telemetry sampler at 2 Hz, as a share of one core (target: under 1%)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from vramchat.daemon.telemetry import TelemetrySampler


def run(quick: bool = False) -> dict[str, Any]:
    duration = 2.0 if quick else 10.0
    sampler = TelemetrySampler()
    pid = os.getpid()  # a live process to read smaps of, as the daemon reads the engine's
    cpu_before, wall_before = time.process_time(), time.monotonic()
    samples = 0
    while time.monotonic() - wall_before < duration:
        sampler.sample(engine_pid=pid)
        samples += 1
        time.sleep(0.5)
    cpu = time.process_time() - cpu_before
    wall = time.monotonic() - wall_before
    percent = 100 * cpu / wall
    return {
        "name": "telemetry sampler CPU at 2 Hz",
        "samples": samples,
        "cpu_ms_per_sample": 1000 * cpu / samples,
        "percent_of_one_core": percent,
        "target": "under 1% of one core",
        "met": percent < 1.0,
    }


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
