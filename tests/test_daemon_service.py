"""The daemon under systemd: sd_notify messages from a real daemon, and SIGTERM handling."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vramchat.shared.client import Client

from helpers import DaemonFactory, DaemonProcess, start_long_reply


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def received(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(until in m for m in messages):
            return messages
    raise AssertionError(f"no {until!r} in {messages}")


def test_daemon_notifies_ready_status_watchdog_and_stopping(
    daemon_factory: DaemonFactory, models_dir: Path, notify_socket: socket.socket, tmp_path: Path
) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), start=False)
    daemon.env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    daemon.start()
    messages = received(notify_socket, "STATUS=serving tiny.gguf")
    ready = next(m for m in messages if "READY=1" in m)
    assert f"MAINPID={daemon.pid}" in ready
    received(notify_socket, "WATCHDOG=1")  # every 0.1 s: half of WATCHDOG_USEC
    assert daemon.stop() == 0
    received(notify_socket, "STOPPING=1")


async def test_sigterm_mid_reply_stores_the_reply_and_exits_cleanly(big_context_daemon: DaemonProcess) -> None:
    daemon = big_context_daemon
    async with Client(daemon.runtime_dir) as client:
        _, _, accepted, tokens = await start_long_reply(client, 10)  # UNBOUNDED: stopped mid-reply at any speed
        assert daemon.stop() == 0
    assert not (daemon.runtime_dir / "control.sock").exists()
    daemon.start("--no-load")
    async with Client(daemon.runtime_dir) as client:
        stored = await client.request("conversation.get", {"id": accepted["conversation"]})
    reply = stored["messages"][-1]
    assert reply["status"] == "cancelled" and reply["error"] == "the daemon was stopped"
    assert reply["content"].startswith("".join(tokens)) and reply["stats"]["generated_tokens"] >= 10
