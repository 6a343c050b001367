"""Starts and stops engine processes and turns their messages into an asyncio queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import msgpack
import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

_engine_numbers = itertools.count(1)


class LoadFailed(Exception):
    pass


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (a native crash in llama.cpp)" if name in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL") else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {returncode}"


class EngineProcess:
    """One running engine: the child process and the PAIR socket to it.

    Every message from the engine lands in `events`; when the process ends, a final
    ``{"ev": "exited", "returncode": N}`` follows, so whoever waits on the queue learns of a crash.

    The socket is a plain one, read by a callback on its file descriptor rather than through
    zmq.asyncio, which costs a third more CPU per message (docs/benchmarks.md, issue 15): a
    message arrives for every frame of tokens. The descriptor only signals that the socket's
    state changed, so each callback, and each send, reads everything there is.
    """

    def __init__(self, process: asyncio.subprocess.Process, socket: zmq.Socket[bytes], socket_path: Path) -> None:
        self.process = process
        self.socket = socket
        self.socket_path = socket_path
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self.stopping = False
        # The engine's latest reading of its devices' memory ({"op": "devices"}), RPC ones included.
        self.devices: list[dict[str, Any]] | None = None
        # Told the bytes of KV state the engine keeps, when it keeps a reply's state after it ended.
        self.on_state_cache: Callable[[int], None] = lambda used_bytes: None
        self._loop.add_reader(socket.FD, self._read)
        self._waiter = asyncio.create_task(self._wait())

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def spawn(cls, context: zmq.asyncio.Context, runtime_dir: Path) -> EngineProcess:
        socket_path = runtime_dir / f"engine-{next(_engine_numbers)}.sock"
        socket: zmq.Socket[bytes] = zmq.Socket(context, zmq.PAIR)  # a plain socket in the daemon's context
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(f"ipc://{socket_path}")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vramchat.daemon.engine",
            "--endpoint",
            f"ipc://{socket_path}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sys.stderr,  # llama.cpp may print; keep the daemon's stdout clean
        )
        log.info("engine pid %d started", process.pid)
        return cls(process, socket, socket_path)

    def send(self, message: dict[str, Any]) -> None:
        if not self.exited.done():
            self.socket.send(msgpack.packb(message, use_bin_type=True), flags=zmq.NOBLOCK)
            self._loop.call_soon(self._read)  # a send can take the descriptor's signal of a message in

    def _read(self) -> None:
        while not self.socket.closed and cast(int, self.socket.get(zmq.EVENTS)) & zmq.POLLIN:
            message = msgpack.unpackb(self.socket.recv(zmq.NOBLOCK), raw=False)
            if message.get("ev") == "devices":  # telemetry's, not the reply's: kept aside, newest only
                self.devices = message["devices"]
            elif message.get("ev") == "state_cache":  # between replies: nobody waits on the queue for it
                self.on_state_cache(int(message["bytes"]))
            else:
                self.events.put_nowait(message)

    async def _wait(self) -> None:
        returncode = await self.process.wait()
        await asyncio.sleep(0.05)  # let the reader take what the engine sent before it ended
        self._read()
        self._loop.remove_reader(self.socket.FD)
        self.socket.close()
        self.socket_path.unlink(missing_ok=True)
        if not self.stopping:
            log.warning("engine pid %d %s", self.pid, describe_exit(returncode))
        self.events.put_nowait({"ev": "exited", "returncode": returncode})
        self.exited.set_result(returncode)

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the engine to exit, then kill it if it does not."""
        self.stopping = True
        if self.exited.done():
            return
        self.send({"op": "shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            log.warning("engine pid %d did not exit in %.0f s; killing it", self.pid, timeout)
            self.process.kill()
            await self.exited


async def launch(
    context: zmq.asyncio.Context,
    runtime_dir: Path,
    params: dict[str, Any],
    on_progress: Callable[[float], None],
) -> tuple[EngineProcess, dict[str, Any]]:
    """Start an engine and load a model in it; returns the engine and its `ready` message."""
    engine = await EngineProcess.spawn(context, runtime_dir)
    while True:
        event = await engine.events.get()
        kind = event.get("ev")
        if kind == "started":  # connected: from now on sends reach it
            engine.send({"op": "load", **params})
        elif kind == "progress":
            on_progress(float(event["fraction"]))
        elif kind == "ready":
            return engine, event
        elif kind == "load_failed":
            await engine.stop()
            raise LoadFailed(event["error"])
        elif kind == "exited":
            raise LoadFailed(
                f"the engine {describe_exit(event['returncode'])} while loading the model; "
                "the file may be damaged, or it needs more memory than is free"
            )
