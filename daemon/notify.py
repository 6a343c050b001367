"""sd_notify(3) without libsystemd: READY, STATUS, WATCHDOG and STOPPING datagrams.

Under `Type=notify` systemd passes the address of its notification socket in $NOTIFY_SOCKET
(a path, or an abstract name written with a leading "@"). Without it every call is a no-op, so
the daemon calls these unconditionally. A notification is never worth crashing the daemon for:
every error is logged once and swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

# What systemd hands the main process; the engine child must not inherit it.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """`address` as in $NOTIFY_SOCKET; `watchdog_usec` already checked against $WATCHDOG_PID."""
        self._display = address
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID.

        With `unset` (the default, like sd_notify's unset_environment) the variables are removed
        from `environ` so that child processes, the engine included, cannot notify in our name.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = _watchdog_usec(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        if unset:
            for name in NOTIFY_ENV:
                env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str) -> None:
        """The sockets are bound: clients can attach (a model may still be loading)."""
        self._send(f"READY=1\nSTATUS={_one_line(status)}\nMAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec=), or None when no watchdog applies to us."""
        if not self.enabled or not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def watchdog_loop(self) -> None:
        """Ping the watchdog from the event loop, so a blocked loop is what systemd notices.

        Returns at once when there is no watchdog; run it as a task and cancel it on shutdown.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self._display, exc)
                self._failed = True


def _socket_address(address: str) -> str | None:
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # systemd >= 254 may also pass vsock: addresses (VMs); the daemon never runs that way.
    log.warning("ignoring NOTIFY_SOCKET=%r: only unix socket addresses are supported", address)
    return None


def _watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    if not usec:
        return None
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None


def _one_line(text: str) -> str:
    """A newline would end the STATUS= assignment and start a bogus one."""
    return " ".join(text.split())
