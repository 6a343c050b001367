"""The private channel between the daemon and its engine: msgpack maps back to back on one end each
of a Unix socketpair, which the engine inherits as a file descriptor.

Not a ZeroMQ socket, because a message crosses it for every frame of tokens and ZeroMQ's I/O threads
make each one cost two more thread wakeups: on a 2-core VM the engine's send took 92 us of CPU
against 46 us for a plain socket's, and each side's I/O thread another 40 to 90 us per token, CPU
taken from the llama threads (docs/benchmarks.md, issue 15). msgpack frames itself, so the stream
needs no length prefix.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import select
import socket
from collections.abc import Callable
from typing import Any

import msgpack

log = logging.getLogger(__name__)

READ_BYTES = 1 << 20


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


class ChannelClosed(Exception):
    """The daemon's end is gone: the engine has nobody to work for."""


class EngineEnd:
    """The engine's end, blocking: it runs on the engine's one thread, between tokens."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False)
        self.received: collections.deque[dict[str, Any]] = collections.deque()
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(pack(message))

    def poll(self, timeout_ms: int) -> bool:
        """Whether a whole message is here, waiting up to `timeout_ms` for data."""
        if not self.received and self.poller.poll(timeout_ms):
            self._read()
        return bool(self.received)

    def recv(self) -> dict[str, Any]:
        while not self.received:
            self._read()
        return self.received.popleft()

    def _read(self) -> None:
        data = self.sock.recv(READ_BYTES)
        if not data:
            raise ChannelClosed("the daemon closed the engine's channel")
        self.unpacker.feed(data)
        self.received.extend(self.unpacker)

    def close(self) -> None:
        self.sock.close()


class DaemonEnd(asyncio.Protocol):
    """The daemon's end, on its event loop: each message is handed to `on_message` as it arrives."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], on_broken: Callable[[str], None]) -> None:
        self.on_message, self.on_broken = on_message, on_broken
        self.unpacker = msgpack.Unpacker(raw=False)
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def open(
        cls, sock: socket.socket, on_message: Callable[[dict[str, Any]], None], on_broken: Callable[[str], None]
    ) -> DaemonEnd:
        """`on_broken` is told why when the stream can no longer be trusted: the engine must go."""
        _, end = await asyncio.get_running_loop().create_unix_connection(lambda: cls(on_message, on_broken), sock=sock)
        return end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Hand on each whole message. Anything unreadable, or a message that cannot be handled,
        breaks the channel: a lost `done` would leave its reply waiting forever, so the engine is
        stopped instead, which ends the reply in flight as interrupted and reloads the model."""
        try:
            self.unpacker.feed(data)
            for message in self.unpacker:
                if not isinstance(message, dict):
                    raise ValueError(f"a message is not a map: {message!r:.60}")
                self.on_message(message)
        except Exception as exc:
            log.exception("the engine's channel broke")
            self.close()
            self.on_broken(f"{type(exc).__name__}: {exc}")

    def send(self, message: dict[str, Any]) -> None:
        """Buffered by the transport when the engine is busy; dropped once the engine is gone."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pack(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
