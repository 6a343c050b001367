"""Starting a daemon for a benchmark, and describing the machine it ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class BenchDaemon:
    process: subprocess.Popen[bytes]
    runtime_dir: Path


@contextlib.contextmanager
def daemon(*args: str, config: str = "") -> Iterator[BenchDaemon]:
    """A vramchatd on private dirs, stopped and cleaned up afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    (root / "config.toml").write_text(config)
    process = subprocess.Popen(
        [sys.executable, "-m", "vramchat.daemon.cli", "--runtime-dir", str(root / "run"), "--data-dir", str(root / "data"),
         "--config", str(root / "config.toml"), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (root / "run" / "control.sock").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("vramchatd did not start")
            time.sleep(0.05)
        yield BenchDaemon(process, root / "run")
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 1073741824:.0f} GiB RAM, "
            f"Python {platform.python_version()}, load average {load}")
