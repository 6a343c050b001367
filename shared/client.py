"""The async client that the TUI, the CLI and the tests use to talk to vramchatd.

Requests go over a DEALER socket and are matched to replies by id, so several can be in flight
(a long `load` does not block a `chat`). Events come over a SUB socket. `stream()` implements the
late-join half of the Clone pattern: subscribe, wait until the subscription is live, take a
snapshot, then yield only newer events, and start over from a fresh snapshot on a gap or when the
daemon restarts (a new epoch).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any, TypeVar, cast

import zmq
import zmq.asyncio

from vramchat.shared import paths, protocol
from vramchat.shared.config import load_config
from vramchat.shared.curve_client import apply_client_curve, client_keys, load_public_key
from vramchat.shared.protocol import Event

SocketT = TypeVar("SocketT", bound=zmq.Socket[Any])


class DaemonNotRunning(Exception):
    """No daemon answers on the runtime dir; the message says how to start one."""


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Snapshot:
    """Full daemon state at event `seq` of `epoch`; events after it apply on top."""

    epoch: str
    seq: int
    body: dict[str, Any]


class Client:
    """Attach to the daemon on this machine's ipc sockets, or over TCP with CURVE.

    An explicit `runtime_dir` means ipc. Otherwise `server` (``tcp://HOST:PORT``) with
    `server_public_key`, or the config's `server`, means TCP; failing both, the default runtime dir.
    """

    def __init__(
        self,
        runtime_dir: str | Path | None = None,
        *,
        server: str | None = None,
        server_public_key: str | None = None,
        name: str = "vramchat",
        timeout: float = 10.0,
    ) -> None:
        if runtime_dir is None and server is None:
            config = load_config()
            server, server_public_key = config.server, config.server_public_key
        self.runtime_dir = paths.runtime_dir(runtime_dir)
        self.server_address = None if runtime_dir is not None else server
        self.server_public_key = server_public_key
        self.name = name
        self.timeout = timeout
        self.context = zmq.asyncio.Context.instance()
        self.control: zmq.asyncio.Socket | None = None
        self.events_socket: zmq.Socket[bytes] | None = None
        self._events_loop: asyncio.AbstractEventLoop | None = None  # watches the events socket's descriptor
        self._events_ready: asyncio.Event | None = None  # it signalled: try to read
        self.server: dict[str, Any] = {}
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.max_request_bytes = protocol.MAX_REQUEST_BYTES
        # With `token_pace_s` set (the TUI sets its frame interval's half), `tok` events are read in
        # batches at most that often: a reply's frames then wake this process a few times a second
        # instead of once per frame. A second socket subscribed to `msg` alone (the doorbell) still
        # wakes it at once for a message, so the end of a reply is not held back.
        self.token_pace_s = 0.0
        self.doorbell: zmq.Socket[bytes] | None = None
        self._paced_until = 0.0  # loop time: until then the events socket's descriptor is not watched
        self._watching_events = False

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # --- control ---------------------------------------------------------------------------

    def _endpoints(self) -> tuple[str, str]:
        """Control and events endpoints; TCP serves events on the control port + 1."""
        if self.server_address:
            host, _, port = self.server_address.removeprefix("tcp://").rpartition(":")
            return f"tcp://{host}:{port}", f"tcp://{host}:{int(port) + 1}"
        return (f"ipc://{self.runtime_dir / protocol.CONTROL_SOCKET}", f"ipc://{self.runtime_dir / protocol.EVENTS_SOCKET}")

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        return self._secured(self.context.socket(kind))

    def _secured(self, socket: SocketT) -> SocketT:
        socket.setsockopt(zmq.LINGER, 0)
        if self.server_address:
            if not self.server_public_key:
                raise DaemonNotRunning(f"{self.server_address} needs the daemon's public key (server_public_key in the config)")
            public, secret = client_keys(paths.config_path().parent)
            apply_client_curve(socket, load_public_key(os.path.expanduser(self.server_public_key)), public, secret)
        return socket

    async def connect(self) -> dict[str, Any]:
        """Open the control socket and shake hands; raises DaemonNotRunning if nobody answers."""
        control_endpoint, _ = self._endpoints()
        where = self.server_address or str(self.runtime_dir / protocol.CONTROL_SOCKET)
        if not self.server_address and not (self.runtime_dir / protocol.CONTROL_SOCKET).exists():
            raise DaemonNotRunning(
                f"vramchatd is not running (no socket at {where}). Start it with `vramchatd &`, "
                "`make run`, or `systemctl --user start vramchatd`."
            )
        self.control = self._socket(zmq.DEALER)
        # Queue requests only on a live connection, so nothing stale reaches a restarted daemon.
        self.control.setsockopt(zmq.IMMEDIATE, 1)
        self.control.connect(control_endpoint)
        self._reader = asyncio.create_task(self._read_replies())
        try:
            self.server = await self.request(
                "hello", {"protocol": protocol.PROTOCOL_VERSION, "client": self.name}, timeout=min(self.timeout, 5.0)
            )
        except TimeoutError:
            await self.close()
            hint = (
                "is it running, and is your public key in its authorized_keys/?"
                if self.server_address
                else "it may have died and left the socket. Start it again with `vramchatd &`."
            )
            raise DaemonNotRunning(f"vramchatd does not answer on {where}: {hint}") from None
        self.max_request_bytes = int(self.server.get("max_request_bytes", self.max_request_bytes))
        return self.server

    async def request(
        self,
        type_: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | EllipsisType | None = ...,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Send one request and wait for its reply body; raises RequestFailed on an error reply.

        `timeout=None` waits as long as it takes (a load); the default is the client's timeout.
        """
        assert self.control is not None, "connect() first"
        request = protocol.Request(id=request_id or uuid.uuid4().hex, type=type_, body=body or {})
        frame = request.encode()
        if len(frame) > self.max_request_bytes:
            raise RequestFailed(
                "too_large",
                f"the request is {len(frame) / 1048576:.1f} MiB; the daemon accepts at most "
                f"{self.max_request_bytes / 1048576:.0f} MiB. Send a shorter prompt.",
            )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        try:
            await asyncio.wait_for(self.control.send(frame), self.timeout)
            reply = await asyncio.wait_for(future, self.timeout if isinstance(timeout, EllipsisType) else timeout)
        finally:
            self._pending.pop(request.id, None)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RequestFailed(str(error.get("code", "internal")), str(error.get("message", "unknown error")))
        return reply.get("body") or {}

    async def _read_replies(self) -> None:
        assert self.control is not None
        while True:
            frame = await self.control.recv()
            try:
                reply = protocol.unpack(frame)
            except protocol.ProtocolError:
                continue
            future = self._pending.get(str(reply.get("id"))) if isinstance(reply, dict) else None
            if future is not None and not future.done():
                future.set_result(reply)

    # --- events ------------------------------------------------------------------------------

    async def subscribe(self) -> None:
        """Subscribe to every topic and return once the daemon is known to deliver to us.

        A subscription travels to the daemon asynchronously; the daemon publishes a `clients`
        event on every new one, so the first event we receive proves ours is active.

        The socket is a plain one whose descriptor wakes `_next_frames`: zmq.asyncio costs a third
        more CPU per event (docs/benchmarks.md, issue 15), and an event comes with every frame of
        tokens, to every client.
        """
        if self.events_socket is not None:
            return
        socket: zmq.Socket[bytes] = self._secured(zmq.Socket(self.context, zmq.SUB))
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(self._endpoints()[1])
        self.events_socket = socket
        self._events_ready = asyncio.Event()
        self._events_loop = asyncio.get_running_loop()
        self._watch_events(True)
        if self.token_pace_s > 0:
            doorbell: zmq.Socket[bytes] = self._secured(zmq.Socket(self.context, zmq.SUB))
            doorbell.setsockopt(zmq.SUBSCRIBE, b"msg")
            doorbell.connect(self._endpoints()[1])
            self.doorbell = doorbell
            self._events_loop.add_reader(doorbell.FD, self._doorbell_rang)
        self._first_events: list[Event] = []
        try:
            frames = await asyncio.wait_for(self._next_frames(), self.timeout)
        except TimeoutError:
            raise DaemonNotRunning(f"no events from vramchatd at {self._endpoints()[1]}") from None
        if event := protocol.decode_event(frames):
            self._first_events.append(event)

    def _events_signalled(self) -> None:
        # Reading ZMQ_EVENTS also resets the descriptor, which would otherwise stay readable.
        if self.events_socket is not None and self._events_ready and cast(int, self.events_socket.get(zmq.EVENTS)) & zmq.POLLIN:
            self._events_ready.set()

    def _watch_events(self, watch: bool) -> None:
        """Wake on the events socket's descriptor, or not (while `tok` events are paced)."""
        assert self.events_socket is not None and self._events_loop is not None
        if watch and not self._watching_events:
            self._events_loop.add_reader(self.events_socket.FD, self._events_signalled)
        elif not watch and self._watching_events:
            self._events_loop.remove_reader(self.events_socket.FD)
        self._watching_events = watch

    def _doorbell_rang(self) -> None:
        """A `msg` event is on its way on the events socket: stop pacing and read it now. The
        doorbell's own copy only wakes; it is drained, which also resets its descriptor."""
        if self.doorbell is None or self._events_ready is None:
            return
        rang = False
        while cast(int, self.doorbell.get(zmq.EVENTS)) & zmq.POLLIN:
            self.doorbell.recv_multipart(zmq.NOBLOCK)
            rang = True
        if rang:
            self._paced_until = 0.0
            self._events_ready.set()

    async def _next_frames(self) -> list[bytes]:
        """The next event's frames. Messages already queued do not signal the descriptor again,
        so read until there are none before waiting for it. While `tok` events are paced, wait
        for the pace's end or the doorbell instead of the events socket."""
        assert self.events_socket is not None and self._events_ready is not None and self._events_loop is not None
        while True:
            try:
                return self.events_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._events_ready.clear()
                wait = self._paced_until - self._events_loop.time()
                self._watch_events(wait <= 0)
                if wait <= 0:
                    await self._events_ready.wait()
                    continue
                timer = self._events_loop.call_later(wait, self._events_ready.set)
                try:
                    await self._events_ready.wait()
                finally:
                    timer.cancel()
                self._paced_until = 0.0

    def _paced(self, event: Event) -> Event:
        """A `tok` event starts a pace unless one runs: the events after it are read together,
        once the events socket has none queued, `token_pace_s` after it."""
        if event.topic == "tok" and self.token_pace_s > 0 and self._events_loop is not None:
            now = self._events_loop.time()
            if self._paced_until <= now:
                self._paced_until = now + self.token_pace_s
        return event

    async def raw_events(self) -> AsyncIterator[Event]:
        """Every event as it arrives, with no snapshot and no gap handling (for `ask`)."""
        await self.subscribe()
        assert self.events_socket is not None
        while self._first_events:
            yield self._first_events.pop(0)
        while True:
            event = protocol.decode_event(await self._next_frames())
            if event is not None:
                yield self._paced(event)

    async def stream(self) -> AsyncIterator[Snapshot | Event]:
        """A Snapshot, then the events after it, in order; a new Snapshot after any gap or restart."""
        await self.subscribe()
        events = self.raw_events()
        while True:
            snapshot_body = await self.request("snapshot")
            snapshot = Snapshot(epoch=snapshot_body["epoch"], seq=snapshot_body["seq"], body=snapshot_body)
            yield snapshot
            last_seq = snapshot.seq
            async for event in events:
                if event.epoch != snapshot.epoch:
                    await self._reconnect_control()
                    break  # the daemon restarted: start over from its new state
                if event.seq <= last_seq:
                    continue  # already part of the snapshot
                if event.seq != last_seq + 1:
                    break  # a gap: the publisher dropped events for us
                last_seq = event.seq
                yield event

    async def _reconnect_control(self) -> None:
        """A restarted daemon has a new control socket; the old connection may be dead."""
        if self._reader:
            self._reader.cancel()
        if self.control is not None:
            self.control.close()
        await self.connect()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            self._reader = None
        loop_open = self._events_loop is not None and not self._events_loop.is_closed()
        if self.events_socket is not None:
            if loop_open:
                self._watch_events(False)
            self.events_socket.close()
        if self.doorbell is not None:
            if loop_open and self._events_loop is not None:
                self._events_loop.remove_reader(self.doorbell.FD)
            self.doorbell.close()
        if self.control is not None:
            self.control.close()
        self.control = self.events_socket = self.doorbell = None
        self._paced_until = 0.0
