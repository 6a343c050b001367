"""Starts and stops engine processes and turns their messages into an asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from vramchat.daemon.engine_channel import DaemonEnd

log = logging.getLogger(__name__)


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
    """One running engine: the child process and the channel to it (daemon/engine_channel.py).

    Every message from the engine lands in `events`; when the process ends, a final
    ``{"ev": "exited", "returncode": N}`` follows, so whoever waits on the queue learns of a crash.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.channel: DaemonEnd | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self.stopping = False
        # The engine's latest reading of its devices' memory ({"op": "devices"}), RPC ones included.
        self.devices: list[dict[str, Any]] | None = None
        # Told the bytes of KV state the engine keeps, when it keeps a reply's state after it ended.
        self.on_state_cache: Callable[[int], None] = lambda used_bytes: None
        self._waiter: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def spawn(cls) -> EngineProcess:
        daemon_side, engine_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with engine_side:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vramchat.daemon.llama.engine",
                "--fd",
                str(engine_side.fileno()),
                pass_fds=(engine_side.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sys.stderr,  # llama.cpp may print; keep the daemon's stdout clean
            )
        log.info("engine pid %d started", process.pid)
        engine = cls(process)
        engine.channel = await DaemonEnd.open(daemon_side, engine._received, engine._channel_broke)
        engine._waiter = asyncio.create_task(engine._wait())
        return engine

    def send(self, message: dict[str, Any]) -> None:
        if self.channel is not None and not self.exited.done():
            self.channel.send(message)

    def _received(self, message: dict[str, Any]) -> None:
        if message.get("ev") == "devices":  # telemetry's, not the reply's: kept aside, newest only
            self.devices = message["devices"]
        elif message.get("ev") == "state_cache":  # between replies: nobody waits on the queue for it
            self.on_state_cache(int(message["bytes"]))
        else:
            self.events.put_nowait(message)

    def _channel_broke(self, reason: str) -> None:
        """The engine sent what the daemon cannot read: its replies can no longer be followed."""
        log.error("engine pid %d sent something unreadable (%s); stopping it", self.pid, reason)
        if self.process.returncode is None:
            self.process.kill()

    async def _wait(self) -> None:
        returncode = await self.process.wait()
        await asyncio.sleep(0.05)  # let the channel take what the engine sent before it ended
        if self.channel is not None:
            self.channel.close()
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


async def launch(params: dict[str, Any], on_progress: Callable[[float], None]) -> tuple[EngineProcess, dict[str, Any]]:
    """Start an engine and load a model in it; returns the engine and its `ready` message."""
    engine = await EngineProcess.spawn()
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
