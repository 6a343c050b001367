"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from vramchat.daemon.notify import Notifier

from helpers import until


def receive_datagram(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def receive(sock: socket.socket) -> dict[str, str]:
    return receive_datagram(sock.recv(4096))


@pytest.fixture
def fake_systemd() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket on a short path (sun_path is limited to ~108 bytes)."""
    directory = tempfile.mkdtemp(prefix="vc-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def test_messages_reach_the_notify_socket(fake_systemd: tuple[socket.socket, str]) -> None:
    sock, path = fake_systemd
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    notifier.ready("listening;\nno model loaded")
    assert receive(sock) == {"READY": "1", "STATUS": "listening; no model loaded", "MAINPID": str(os.getpid())}
    notifier.status("loading llama-70b")
    assert receive(sock) == {"STATUS": "loading llama-70b"}
    notifier.watchdog()
    assert receive(sock) == {"WATCHDOG": "1"}
    notifier.stopping()
    assert receive(sock) == {"STOPPING": "1"}
    notifier.close()


def test_abstract_socket_address() -> None:
    name = f"vramchat-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert receive(sock)["READY"] == "1"


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    notifier.ready("up")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    assert notifier.watchdog_interval() is None


def test_a_vanished_socket_never_raises_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": f"{tmp_path}/gone"})
    notifier.ready("up")
    notifier.watchdog()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_environment_is_removed_so_children_cannot_notify(fake_systemd: tuple[socket.socket, str]) -> None:
    _, path = fake_systemd
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/h"}
    Notifier.from_env(env)
    assert env == {"HOME": "/h"}
    kept = dict(env, NOTIFY_SOCKET=path)
    Notifier.from_env(kept, unset=False)
    assert kept["NOTIFY_SOCKET"] == path


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),  # the watchdog is meant for another process
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    fake_systemd: tuple[socket.socket, str], usec: str | None, pid: str | None, expected: float | None
) -> None:
    _, path = fake_systemd
    env = {"NOTIFY_SOCKET": path}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier.from_env(env).watchdog_interval() == expected


async def test_watchdog_loop_pings_at_half_the_timeout(fake_systemd: tuple[socket.socket, str]) -> None:
    sock, path = fake_systemd
    sock.setblocking(False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    loop = asyncio.get_running_loop()
    pings: list[dict[str, str]] = []
    arrived: list[float] = []

    async def three_pings() -> bool:
        pings.append(receive_datagram(await loop.sock_recv(sock, 4096)))
        arrived.append(loop.time())
        return len(pings) == 3

    started = loop.time()
    task = asyncio.create_task(notifier.watchdog_loop())
    try:
        await until(three_pings, timeout=5, what=lambda: f"3 pings (got {pings})", interval=0)
    finally:
        task.cancel()
    assert pings == [{"WATCHDOG": "1"}] * 3
    # Pings at 0, 0.1 and 0.2 s: the first at once, then every half of WATCHDOG_USEC.
    assert arrived[0] - started < 0.1
    gaps = [later - earlier for earlier, later in pairwise(arrived)]
    assert all(0.09 <= gap < 0.2 for gap in gaps), gaps


async def test_watchdog_loop_returns_without_a_watchdog() -> None:
    await asyncio.wait_for(Notifier.from_env({}).watchdog_loop(), 1)
