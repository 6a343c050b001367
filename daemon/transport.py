"""The daemon's sockets: ipc and TCP listeners, the control loop, replies, rate limits, the instance lock."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zmq
import zmq.asyncio

from vramchat.daemon import curve
from vramchat.shared import protocol
from vramchat.shared.protocol import ProtocolError, Request

log = logging.getLogger(__name__)

# Each client may send this many requests in a burst, refilled at RATE_PER_S.
RATE_BURST = 200
RATE_PER_S = 100.0


@dataclass
class Listener:
    """A ROUTER for requests and an XPUB for events: one pair on ipc, one on TCP if configured."""

    name: str
    control: zmq.asyncio.Socket
    events: zmq.asyncio.Socket
    # `events` without zmq.asyncio's wrapper, for sends that never wait: an event is published
    # for every frame of tokens, and the wrapper adds a quarter to each send's CPU (issue 15).
    publisher: zmq.Socket[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.publisher = zmq.Socket.shadow(self.events.underlying)

    def close(self) -> None:
        self.control.close()
        self.events.close()


@dataclass(frozen=True)
class Replier:
    """Sends the one reply a request gets, on the socket it came in on."""

    socket: zmq.asyncio.Socket
    identity: bytes

    def ok(self, request_id: str, body: dict[str, object]) -> None:
        self._send(protocol.encode_reply(request_id, body))

    def error(self, request_id: str | None, error: ProtocolError) -> None:
        self._send(protocol.encode_error(request_id, error))

    def _send(self, frame: bytes) -> None:
        try:
            self.socket.send_multipart([self.identity, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone, or not reading: its loss, not ours
            log.debug("reply not sent: %s", exc)


class RateLimiter:
    """A token bucket per client, so one client cannot starve the others."""

    def __init__(self, burst: int = RATE_BURST, per_second: float = RATE_PER_S) -> None:
        self.burst, self.per_second = burst, per_second
        self.buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, client: bytes) -> bool:
        now = time.monotonic()
        tokens, since = self.buckets.get(client, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - since) * self.per_second)
        if len(self.buckets) > 10_000:  # forget idle clients rather than grow without bound
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
        allowed = tokens >= 1
        self.buckets[client] = (tokens - 1 if allowed else tokens, now)
        return allowed


# A decoded request, the client it came from (unique across listeners) and where to answer.
Dispatch = Callable[[Request, bytes, Replier], Awaitable[None]]


class Transport:
    """Binds the listeners and runs their control loops; what a request means is the handlers' business."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.context = context
        self.listeners: list[Listener] = []
        self.rate_limiter = RateLimiter()
        self._authenticator: curve.AsyncioAuthenticator | None = None

    def bind_ipc(self, runtime_dir: Path, group_access: bool) -> None:
        """The sockets follow the umask, so set it to match the directory's mode while binding."""
        old_umask = os.umask(0o007 if group_access else 0o077)
        try:
            control, events = (
                f"ipc://{_checked_ipc_path(runtime_dir / name)}" for name in (protocol.CONTROL_SOCKET, protocol.EVENTS_SOCKET)
            )
            self.listeners.append(self._listener("ipc", control, events))
        finally:
            os.umask(old_umask)

    def bind_tcp(self, address: str, *, insecure: bool, data_dir: Path) -> None:
        """Control on PORT and events on PORT+1, with CURVE unless `insecure`."""
        host, _, port_text = address.rpartition(":")
        if not host or not port_text.isdigit():
            raise SystemExit(f"--tcp wants HOST:PORT, e.g. 127.0.0.1:5555, not {address!r}")
        port = int(port_text)
        endpoints = (f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}")
        if insecure:
            log.warning(
                "SERVING PLAIN TCP ON %s:%d-%d: NO ENCRYPTION, NO AUTHENTICATION; anyone who can "
                "reach the port can read every conversation and load any model",
                host,
                port,
                port + 1,
            )
            self.listeners.append(self._listener("tcp", *endpoints))
            return
        keys_dir = curve.keys_dir(data_dir)
        try:
            keys = curve.load_server_secret(keys_dir, endpoints[0])
        except curve.CurveKeyError as exc:
            raise SystemExit(str(exc)) from None
        self._authenticator = curve.start_authenticator(self.context, curve.authorized_dir(keys_dir))
        log.info("serving CURVE TCP on %s:%d-%d for the keys in %s", host, port, port + 1, curve.authorized_dir(keys_dir))
        self.listeners.append(self._listener("tcp", *endpoints, curve_keys=keys))

    def _listener(
        self, name: str, control_endpoint: str, events_endpoint: str, curve_keys: tuple[bytes, bytes] | None = None
    ) -> Listener:
        sockets = []
        for kind, endpoint in ((zmq.ROUTER, control_endpoint), (zmq.XPUB, events_endpoint)):
            socket = self.context.socket(kind)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, protocol.ZMQ_MAX_MESSAGE_BYTES)
            if kind == zmq.XPUB:
                socket.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, for the client count
                socket.setsockopt(zmq.SNDHWM, 100_000)
            if curve_keys:
                curve.make_curve_server(socket, *curve_keys)
            socket.bind(endpoint)
            sockets.append(socket)
        return Listener(name, *sockets)

    async def serve_control(self, index: int, dispatch: Dispatch) -> None:
        """Receive requests on listener `index` forever: rate limit, decode, hand to `dispatch`."""
        control = self.listeners[index].control
        # ROUTER identities are only unique per socket: prefix them with the socket's number.
        prefix = b"%d:" % index
        while True:
            frames = await control.recv_multipart(copy=True)
            identity, payload = frames[0], frames[1:]
            reply = Replier(control, identity)
            try:
                await self._take_in(prefix + identity, payload, reply, dispatch)
            except Exception:  # a bug: this request fails, with an answer, and the loop goes on
                log.exception("control request from %r failed", identity)
                reply.error(None, ProtocolError("internal", "the daemon failed on this request; see its log"))

    async def _take_in(self, client: bytes, payload: list[bytes], reply: Replier, dispatch: Dispatch) -> None:
        """Rate limit, decode and dispatch one request; each refusal gets its error reply."""
        if not self.rate_limiter.allow(client):
            request_id = protocol.request_id_of(payload[0]) if len(payload) == 1 else None
            reply.error(request_id, ProtocolError("rate_limited", f"more than {RATE_PER_S:.0f} requests a second; slow down"))
            return
        if len(payload) != 1:
            reply.error(None, ProtocolError("bad_request", "a request is exactly one frame"))
            return
        try:
            request = protocol.decode_request(payload[0])
        except ProtocolError as error:
            reply.error(protocol.request_id_of(payload[0]), error)
            return
        await dispatch(request, client, reply)

    def close(self, runtime_dir: Path) -> None:
        for listener in self.listeners:
            listener.close()
        if self._authenticator:
            self._authenticator.stop()
        for name in (protocol.CONTROL_SOCKET, protocol.EVENTS_SOCKET):
            (runtime_dir / name).unlink(missing_ok=True)


def _checked_ipc_path(path: Path) -> Path:
    if len(str(path)) > 100:
        raise SystemExit(f"socket path {path} is too long for a Unix socket; use a shorter --runtime-dir")
    path.unlink(missing_ok=True)
    return path


def take_instance_lock(runtime_dir: Path) -> IO[str]:
    """One daemon per runtime dir: a second one would steal the first one's sockets.

    The lock lasts as long as the returned file stays open.
    """
    lock = (runtime_dir / "vramchatd.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise SystemExit(f"another vramchatd (pid {holder}) already serves {runtime_dir}; stop it first") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock
