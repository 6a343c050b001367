"""Shared by the benchmarks: a private daemon, the engine's generation loop run in-process, a
plain ZeroMQ client, statistics, and a description of the machine.

Every benchmark module has `run(quick: bool = False) -> dict`. The dict holds `name`, `settings`,
the measured figures (numbers, booleans, short strings), and `targets`: a list of
{"figure", "target", "met", "why"} where `why` explains a miss from what was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

from vramchat.daemon.llama.chat_model import ChatModel
from vramchat.shared import protocol, scheduling
from vramchat.shared.client import Client
from vramchat.shared.paths import demo_model_path

CPUS = os.cpu_count() or 1
# A prompt that makes the demo model write well past 200 tokens before its end-of-generation token.
PROMPT = "Write a long story about a lighthouse keeper and a storm."


# --- the daemon ------------------------------------------------------------------------------


@dataclass
class BenchDaemon:
    process: subprocess.Popen[bytes]
    root: Path
    runtime_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.root / "daemon.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextlib.contextmanager
def daemon(*args: str, config: str = "") -> Iterator[BenchDaemon]:
    """A vramchatd on private, short dirs (ipc paths are limited to ~100 bytes), stopped after."""
    root = Path(tempfile.mkdtemp(prefix="vcb-"))
    (root / "config.toml").write_text(config)
    log = (root / "daemon.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vramchat.daemon.cli",
            "--runtime-dir",
            str(root / "run"),
            "--data-dir",
            str(root / "data"),
            "--config",
            str(root / "config.toml"),
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    bench = BenchDaemon(process, root, root / "run")
    try:
        deadline = time.monotonic() + 60
        while not (root / "run" / protocol.CONTROL_SOCKET).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vramchatd did not start:\n{bench.log_tail()}")
            time.sleep(0.05)
        yield bench
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


async def wait_ready(client: Client, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        model = (await client.request("status"))["model"]
        if model.get("state") == "ready":
            return model
        if model.get("state") == "error" or time.monotonic() > deadline:
            raise RuntimeError(f"the model did not load: {model.get('error')}")
        await asyncio.sleep(0.05)


async def chat_and_collect(client: Client, events: Any, max_tokens: int, content: str = PROMPT, seed: int = 1) -> dict[str, Any]:
    """Send one chat and follow it to its final `msg` event, stamping every token on receipt (the
    tokens of one `tok` event share its stamp)."""
    request_id = uuid.uuid4().hex
    started = time.perf_counter()
    await client.request(
        "chat",
        {"content": content, "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "seed": seed}},
        request_id=request_id,
    )
    received: list[float] = []
    latencies: list[float] = []
    texts: list[str] = []
    events_received = 0
    async for event in events:
        if event.topic == "tok" and event.body["request"] == request_id:
            now, wall = time.perf_counter(), time.time()
            stamps = event.body["t_tokens"]
            received += [now] * len(stamps)
            latencies += [wall - t for t in stamps]
            texts.append(event.body["text"])
            events_received += 1
        elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
            return {
                "started": started,
                "received": received,
                "events": events_received,
                "latencies": latencies,
                "text": "".join(texts),
                "message": event.body,
                "stats": event.body.get("stats") or {},
            }
    raise RuntimeError("the event stream ended")


def demo_model() -> Path:
    """The demo model's path; `make bench` installs it first."""
    path = demo_model_path()
    if path is None:
        raise SystemExit("the demo model is not installed: run `make install`")
    return path


# --- the engine's loop, in this process --------------------------------------------------------


@contextlib.contextmanager
def engine_slice() -> Iterator[None]:
    """The scheduler slice the engine runs with, for the loop run in this process, which otherwise
    has the short one of a client (`python -m benchmarks` asks for it, as the TUI does): llama.cpp's
    threads start from the thread that first computes, and keep its slice (shared/scheduling.py)."""
    scheduling.use_default_slice()
    try:
        yield
    finally:
        scheduling.use_short_slice()


class DirectModel:
    """The demo model loaded and run in this process through the engine's own ChatModel (format
    with the GGUF template, tokenize, Llama.generate(), incremental detokenization, the stop-string
    filter), minus the sending."""

    def __init__(self, model_path: str, n_threads: int = CPUS, n_ctx: int = 4096) -> None:
        started = time.perf_counter()
        with engine_slice():
            self.model = ChatModel.load(model_path, n_gpu_layers=0, n_ctx=n_ctx, n_threads=n_threads)
        self.llm = self.model.llm
        self.load_seconds = time.perf_counter() - started

    def generate(
        self, messages: list[dict[str, str]], max_tokens: int, seed: int = 1, each: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """`each` gets every token's text as the engine's loop would hand it on ("" included)."""
        started = time.perf_counter()
        prompt = self.model.prompt(messages)
        reply = self.model.reply(prompt, {"temperature": 0.0, "seed": seed, "max_tokens": max_tokens})
        self.llm.set_seed(seed)
        produced: list[float] = []
        pieces: list[str] = []
        with engine_slice():
            for text in reply:
                if each is not None:
                    each(text)
                if text:
                    produced.append(time.perf_counter())
                    pieces.append(text)
        return {
            "started": started,
            "produced": produced,
            "text": "".join(pieces),
            "generated": reply.generated,
            "prompt_tokens": len(prompt.tokens),
        }


# --- a plain ZeroMQ client (no asyncio), for timing the relay itself ---------------------------


class RawClient:
    """DEALER + SUB with blocking sockets; speaks the wire protocol by hand (docs/protocol.md)."""

    def __init__(self, control: str, events: str, topics: tuple[bytes, ...] = (b"",)) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(control)
        self.events = self.context.socket(zmq.SUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.RCVHWM, 100_000)
        for topic in topics:
            self.events.setsockopt(zmq.SUBSCRIBE, topic)
        self.events.connect(events)

    def request(self, type_: str, body: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        self.control.send(protocol.Request(id=request_id, type=type_, body=body or {}).encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.control.poll(100):
                reply = msgpack.unpackb(self.control.recv(), raw=False)
                if reply.get("id") == request_id:
                    if not reply.get("ok"):
                        raise RuntimeError(f"{type_} failed: {reply.get('error')}")
                    return reply.get("body") or {}
        raise TimeoutError(f"no reply to {type_}")

    def close(self) -> None:
        self.control.close()
        self.events.close()


# --- numbers ---------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..1."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def rate(stamps: list[float]) -> float:
    """Tokens per second between the first and the last stamp (the first token's wait excluded)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else float("nan")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


SLEEP_LOOP = """
import sys, time
interval, duration = float(sys.argv[1]), float(sys.argv[2])
began, end = time.process_time(), time.monotonic() + duration
while time.monotonic() < end:
    time.sleep(interval)
print(100 * (time.process_time() - began) / duration)
"""


def wakeups(pid: int) -> int:
    """Voluntary context switches of all the process's threads: how often it slept and woke."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                total += int(f.read().split("voluntary_ctxt_switches:")[1].split()[0])
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
    return total


def sleep_loop_cpu_percent(wakeups_per_s: float, seconds: float) -> float:
    """CPU charged to a process that only sleeps and wakes `wakeups_per_s` times a second."""
    if wakeups_per_s <= 0:
        return 0.0
    out = subprocess.run(
        [sys.executable, "-c", SLEEP_LOOP, str(1 / wakeups_per_s), str(seconds)], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


def loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def target(figure: str, goal: str, met: bool, why: str | None = None) -> dict[str, Any]:
    return {"figure": figure, "target": goal, "met": bool(met), "why": None if met else why}


ECHO = "import os\nwhile os.read(0, 1):\n    os.write(1, b'x')\n"


def pipe_round_trips_ms(idle_s: float, rounds: int = 10) -> float:
    """Median round trip of one byte to a bare echo process and back, after `idle_s` of sleep.

    Nothing of vramchat is involved: it shows what waking a sleeping process costs on this
    machine. On a VM whose vCPUs halt when idle it grows with the idle time before it."""
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert echo.stdin is not None and echo.stdout is not None
    trips = []
    try:
        for _ in range(rounds + 1):  # the first wakes a process that has just started
            time.sleep(idle_s)
            started = time.perf_counter()
            echo.stdin.write(b"x")
            echo.stdout.read(1)
            trips.append(time.perf_counter() - started)
    finally:
        echo.stdin.close()
        echo.wait()
    return 1000 * statistics.median(trips[1:])


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    try:
        from importlib.metadata import version

        llama_version = version("llama_cpp_python")
    except Exception:
        llama_version = "unknown"
    return {
        "cpu": cpu,
        "cores": CPUS,
        "ram_gib": round(psutil.virtual_memory().total / 1073741824, 1),
        "python": platform.python_version(),
        "llama_cpp_python": llama_version,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "kernel": platform.release(),
        "load_average": loadavg(),
        "pipe_round_trip_ms": {"back_to_back": pipe_round_trips_ms(0.0), "after_0.3_s_idle": pipe_round_trips_ms(0.3)},
    }
