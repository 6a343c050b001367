"""The scheduler slices: short for the daemon and its clients, the default for the engine (shared/scheduling.py)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramchat.shared.client import Client
from vramchat.shared.scheduling import SHORT_SLICE_NS

from helpers import chat, collect_reply, wait_ready

KERNEL = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
pytestmark = pytest.mark.skipif(
    KERNEL < (6, 12) or platform.machine() not in ("x86_64", "aarch64"),
    reason="a task's own scheduler slice needs Linux 6.12 or later (and a known syscall number)",
)


def slice_of(pid: int, tid: int | None = None) -> int:
    """The slice the kernel gives a thread (a process's main thread by default), in ns."""
    sched = Path(f"/proc/{pid}/task/{tid or pid}/sched").read_text()
    return int(sched.split("se.slice")[1].split()[1])


DEFAULT_SLICE_NS = slice_of(os.getpid())  # collected before any test can ask this process for the short one


def test_a_process_asks_for_the_short_slice_and_back() -> None:
    """In a child, so that this process keeps its own."""
    script = (
        "from pathlib import Path\n"
        "from vramchat.shared import scheduling\n"
        "def now(): return Path('/proc/self/sched').read_text().split('se.slice')[1].split()[1]\n"
        "print(scheduling.use_short_slice(), now(), scheduling.use_default_slice(), now())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", str(SHORT_SLICE_NS), "True", str(DEFAULT_SLICE_NS)]
    assert SHORT_SLICE_NS < DEFAULT_SLICE_NS


async def test_the_daemon_and_its_threads_run_short_slices_and_the_engine_the_default(tiny_daemon: Any) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        engine_pid = (await wait_ready(client))["engine_pid"]
        await client.subscribe()
        events = client.raw_events()
        request_id, _ = await chat(client, "hello", {"max_tokens": 4})
        _, message = await collect_reply(events, request_id)  # llama.cpp starts its threads at the first compute
        assert message is not None and message["status"] == "complete"
    daemon_pid = tiny_daemon.process.pid
    threads = [int(tid.name) for tid in Path(f"/proc/{daemon_pid}/task").iterdir()]
    zmq_io = [t for t in threads if Path(f"/proc/{daemon_pid}/task/{t}/comm").read_text().startswith("ZMQbg/IO")]
    assert slice_of(daemon_pid) == SHORT_SLICE_NS
    assert zmq_io and all(slice_of(daemon_pid, t) == SHORT_SLICE_NS for t in zmq_io)  # started after it asked
    engine_threads = [int(tid.name) for tid in Path(f"/proc/{engine_pid}/task").iterdir()]
    assert len(engine_threads) > 1 and all(slice_of(engine_pid, t) == DEFAULT_SLICE_NS for t in engine_threads)
