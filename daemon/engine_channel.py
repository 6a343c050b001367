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
import select
import socket
from collections.abc import Callable
from typing import Any

import msgpack

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

    def __init__(self, on_message: Callable[[dict[str, Any]], None]) -> None:
        self.on_message = on_message
        self.unpacker = msgpack.Unpacker(raw=False)
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, sock: socket.socket, on_message: Callable[[dict[str, Any]], None]) -> DaemonEnd:
        _, end = await asyncio.get_running_loop().create_unix_connection(lambda: cls(on_message), sock=sock)
        return end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for message in self.unpacker:
            self.on_message(message)

    def send(self, message: dict[str, Any]) -> None:
        """Buffered by the transport when the engine is busy; dropped once the engine is gone."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pack(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
