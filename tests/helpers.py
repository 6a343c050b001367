"""Helpers shared by the test modules: a vramchatd child process, a private home for each test,
chatting through a Client, pausing an engine, waiting for a condition with a deadline, llama.cpp's
load log, and systemd units. Fixtures live in conftest.py; test modules import from here (and from
http_daemon.py and fake_pynvml.py), never from each other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vramchat.shared.client import Client
from vramchat.shared.protocol import CONTROL_SOCKET, Event

T = TypeVar("T")

VRAMCHATD = [sys.executable, "-m", "vramchat.daemon.cli"]

# Greedy decoding of the tiny random model never emits end-of-generation, so an UNBOUNDED reply
# runs until the context is full: with BIG_CONTEXT, ~65,000 tokens (over 20 s at 3,000 tok/s).
# A test that cancels it, or kills the engine or the daemon, lands mid-reply at any speed, and
# ends it itself rather than waiting for it.
UNBOUNDED: dict[str, Any] = {"temperature": 0.0, "max_tokens": (1 << 31) - 1}
BIG_CONTEXT = ("--ctx", "65536")  # vramchatd arguments; the tiny model's KV cache is then 32 MiB

# --- waiting for a condition -------------------------------------------------------------------


def wait_until(condition: Callable[[], T | None], *, timeout: float, what: str | Callable[[], str], interval: float = 0.02) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail after `timeout` s.

    `what` names the condition in the failure (a callable is evaluated only then, e.g. a log).
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(interval)
    return value


async def until(
    condition: Callable[[], Awaitable[T | None]], *, timeout: float, what: str | Callable[[], str], interval: float = 0.05
) -> T:
    """The asyncio `wait_until`: await `condition()` until it gives something truthy, and return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await condition()):
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        await asyncio.sleep(interval)
    return value


# --- a private home for each test --------------------------------------------------------------


# Variables that point vramchat, or platformdirs, at a developer's own files and sockets; and
# systemd's, which would have the tests' daemons notify the developer's service manager.
USER_VARIABLES = (
    "VRAMCHAT_CONFIG",
    "VRAMCHAT_RUNTIME_DIR",
    "VRAMCHAT_DATA_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "XDG_CACHE_HOME",
    "XDG_RUNTIME_DIR",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)
# The CUDA driver's JIT cache lives in ~/.nv unless this says otherwise: keep the developer's,
# so a CUDA build without code for this GPU compiles its kernels once, not in every test's home.
CUDA_CACHE = "CUDA_CACHE_PATH"


@dataclass(frozen=True)
class IsolatedHome:
    """Where a test's code finds its config, data and sockets: never the developer's own."""

    home: Path
    config_file: Path  # empty, and named by $VRAMCHAT_CONFIG; a test may write keys into it
    runtime_dir: Path  # what paths.runtime_dir() gives: $XDG_RUNTIME_DIR/vramchat
    data_dir: Path  # what paths.data_dir() gives
    cache_dir: Path  # shared by the whole session: the RAM bandwidth is measured once


def isolate_home(monkeypatch: pytest.MonkeyPatch, home: Path, cache_home: Path) -> IsolatedHome:
    """Point HOME, the XDG directories and VRAMCHAT_CONFIG at `home`, through the environment, so
    that daemons, engines and CLIs started as child processes see the same private home.

    The XDG cache is `cache_home`, one directory for the whole session. The llama.cpp build and
    the demo model are found through the venv (sys.executable, importlib), not through HOME; the
    CUDA JIT cache stays where it was.
    """
    monkeypatch.setenv(CUDA_CACHE, os.environ.get(CUDA_CACHE) or str(Path.home() / ".nv" / "ComputeCache"))
    for name in USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config_home, runtime = home / ".config", home / "run"
    runtime.mkdir(mode=0o700, parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    config_file = config_home / "vramchat" / "config.toml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text("")
    monkeypatch.setenv("VRAMCHAT_CONFIG", str(config_file))
    return IsolatedHome(
        home=home,
        config_file=config_file,
        runtime_dir=runtime / "vramchat",
        data_dir=home / ".local" / "share" / "vramchat",
        cache_dir=cache_home / "vramchat",
    )


# --- a real vramchatd --------------------------------------------------------------------------


@dataclass
class DaemonProcess:
    """A vramchatd child process; restartable, with its log kept for failing tests."""

    runtime_dir: Path
    data_dir: Path
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=lambda: list(VRAMCHATD))  # another for a patched daemon

    @property
    def pid(self) -> int:
        assert self.process is not None, "vramchatd was never started"
        return self.process.pid

    def start(self, *extra: str, wait: bool = True) -> DaemonProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [*self.command, "--runtime-dir", str(self.runtime_dir), "--data-dir", str(self.data_dir), *self.args, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        if wait:
            self.wait_for_socket()
        return self

    def wait_for_socket(self, timeout: float = 20.0) -> None:
        def bound() -> bool:
            assert self.process and self.process.poll() is None, f"vramchatd exited early:\n{self.log()}"
            return (self.runtime_dir / CONTROL_SOCKET).exists()

        wait_until(bound, timeout=timeout, what=lambda: f"vramchatd did not bind:\n{self.log()}", interval=0.05)

    def wait(self, timeout: float) -> int:
        """The exit status, once the daemon has exited on its own (within `timeout` s)."""
        assert self.process is not None, "vramchatd was never started"
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it holds `text`: the daemon goes on logging after its socket appears."""

        def logged() -> str | None:
            log = self.log()
            return log if text in log else None

        return wait_until(logged, timeout=timeout, what=lambda: f"{text!r} not logged:\n{self.log()}", interval=0.05)


# What the daemon_factory fixture gives: make(*vramchatd_args, start=True) -> DaemonProcess.
DaemonFactory = Callable[..., DaemonProcess]


# --- chatting through a Client -----------------------------------------------------------------


async def wait_ready(client: Client, timeout: float = 30.0) -> dict[str, Any]:
    """The status's model once it is ready; fails if it is neither loading nor ready."""

    async def ready() -> dict[str, Any] | None:
        model: dict[str, Any] = (await client.request("status"))["model"]
        if model["state"] == "ready":
            return model
        assert model["state"] in ("loading", "crashed"), model
        return None

    return await until(ready, timeout=timeout, what="the model is ready", interval=0.1)


async def chat(
    client: Client, content: str, sampling: dict[str, Any], conversation: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Send a chat request; its request id and the daemon's reply (conversation, position)."""
    request_id = uuid.uuid4().hex
    body: dict[str, Any] = {"content": content, "sampling": sampling}
    if conversation:
        body["conversation"] = conversation
    return request_id, await client.request("chat", body, request_id=request_id)


async def collect_reply(
    events: AsyncIterator[Event], request_id: str, *, until_tokens: int | None = None
) -> tuple[list[str], dict[str, Any] | None]:
    """The texts of one request's `tok` events (each holds one or more tokens), and its final message
    (None if stopped once `until_tokens` tokens came)."""
    tokens: list[str] = []
    count = 0
    async for event in events:
        if event.topic == "tok" and event.body["request"] == request_id:
            tokens.append(event.body["text"])
            count += event.body["count"]
            if until_tokens is not None and count >= until_tokens:
                return tokens, None
        elif event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
            return tokens, event.body
    raise AssertionError("event stream ended")


async def start_long_reply(
    client: Client, first_tokens: int, sampling: dict[str, Any] | None = None
) -> tuple[AsyncIterator[Event], str, dict[str, Any], list[str]]:
    """Subscribe, ask for a long reply (UNBOUNDED unless `sampling`), and return once its first
    tokens have arrived: the event stream, the request id, the accepted reply, and those tokens."""
    await wait_ready(client)
    await client.subscribe()
    events = client.raw_events()
    request_id, accepted = await chat(client, "hello", sampling or UNBOUNDED)
    tokens, _ = await collect_reply(events, request_id, until_tokens=first_tokens)
    return events, request_id, accepted, tokens


async def wait_running(client: Client, request_id: str, timeout: float = 30.0) -> None:
    """Return once the daemon runs `request_id`: taken off the queue and sent to the engine (which
    need not have started it: it may be `paused`)."""

    async def running() -> bool:
        queue = (await client.request("status"))["queue"]
        return queue["running"] is not None and queue["running"]["request"] == request_id

    await until(running, timeout=timeout, what=f"request {request_id} is running")


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP `pid` (an engine) meanwhile: whatever it was doing is still under way at the end,
    however fast it runs. It is resumed on the way out, even when the block fails."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# --- llama.cpp --------------------------------------------------------------------------------


def load_log(path: Path, **params: Any) -> str:
    """llama.cpp's log while `path` loads in this process."""
    import ctypes

    import llama_cpp  # here, so that importing the helpers (conftest does) does not load llama.cpp

    lines: list[str] = []
    callback = llama_cpp.llama_log_callback(lambda level, text, data: lines.append(text.decode()))
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))  # `callback` stays referenced while it is set
    model = llama_cpp.Llama(str(path), n_gpu_layers=0, verbose=False, **params)
    del model
    return "".join(lines)


# --- systemd units ------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[str]]:
    """Section.Key -> values, in order; repeated keys (DeviceAllow=) keep every value."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RpcServer:
    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def vramchat_status(daemon: DaemonProcess) -> str:
    """What `vramchat status` prints for `daemon`."""
    command = [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "status"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
