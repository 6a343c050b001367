"""Who may attach: ipc sockets for this user only; TCP only with CURVE and a listed key."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq

from vramchat.shared.client import Client, DaemonNotRunning
from vramchat.shared.curve_client import client_keys

from helpers import DaemonFactory, DaemonProcess

OTHER_USER = "vramchat-test-other"


def free_port_pair() -> int:
    """A port P with P and P+1 free on loopback."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def other_user_can_connect(runtime_dir: Path, user: str) -> bool:
    """Can `user` open a connection to the control socket? (The kernel checks at connect().)

    A forked child takes the user's ids and connects: no interpreter is started as that user,
    so nothing has to be readable by it (the venv lives under /root).
    """
    account = pwd.getpwnam(user)
    child = os.fork()
    if child == 0:
        code = 2  # could not become the user
        try:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(runtime_dir / "control.sock"))
                    code = 0
                except OSError:
                    code = 1
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    assert code in (0, 1), f"the probe could not run as {user} (exit {code})"
    return code == 0


@pytest.fixture
def other_user() -> str:
    """A second Unix user to knock on the sockets. Only root can make one and become it, so as
    another user this test fails, not skips: CI and `make test` run as root, as here."""
    assert os.geteuid() == 0, "run the tests as root: checking that another user is kept out needs a second user"
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", OTHER_USER], check=True)
    return OTHER_USER


def test_another_user_cannot_reach_the_ipc_sockets(tiny_daemon: DaemonProcess, other_user: str) -> None:
    # Open the directories above the runtime dir, so the 0700 runtime dir is what keeps them out.
    tiny_daemon.runtime_dir.parent.chmod(0o755)
    assert (tiny_daemon.runtime_dir.stat().st_mode & 0o777) == 0o700
    assert not other_user_can_connect(tiny_daemon.runtime_dir, other_user)
    # Control: the same probe works once the directory lets the user in, so the probe is sound.
    tiny_daemon.runtime_dir.chmod(0o711)
    (tiny_daemon.runtime_dir / "control.sock").chmod(0o777)
    assert other_user_can_connect(tiny_daemon.runtime_dir, other_user)


def test_the_daemon_refuses_a_runtime_dir_open_to_others(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory("--no-load", start=False)
    daemon.runtime_dir.mkdir(parents=True)
    daemon.runtime_dir.chmod(0o755)
    daemon.start(wait=False)
    assert daemon.wait(30) == 1
    assert "0755" in daemon.log() and "chmod 700" in daemon.log()


@pytest.fixture
def curve_setup(daemon_factory: DaemonFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Server keys made by `vramchatd keys`, and one client whose public key is authorized."""
    daemon = daemon_factory("--no-load", start=False)
    keys = subprocess.run(
        [sys.executable, "-m", "vramchat.daemon.cli", "--data-dir", str(daemon.data_dir), "keys"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert keys.returncode == 0, keys.stderr
    curve_dir = daemon.data_dir / "curve"
    assert (curve_dir / "server.key_secret").stat().st_mode & 0o777 == 0o600
    allowed_config = tmp_path / "allowed"
    allowed_config.mkdir()
    (allowed_config / "config.toml").write_text("")  # the daemon inherits VRAMCHAT_CONFIG too
    monkeypatch.setenv("VRAMCHAT_CONFIG", str(allowed_config / "config.toml"))
    client_keys(allowed_config)
    shutil.copy(allowed_config / "curve" / "client.key", curve_dir / "authorized_keys" / "laptop.key")
    port = free_port_pair()
    return {"daemon": daemon, "port": port, "server_key": str(curve_dir / "server.key")}


async def test_tcp_with_curve_accepts_a_listed_key_and_rejects_others(
    curve_setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, port = curve_setup["daemon"], curve_setup["port"]
    daemon.start("--tcp", f"127.0.0.1:{port}")
    server = f"tcp://127.0.0.1:{port}"
    async with Client(server=server, server_public_key=curve_setup["server_key"], timeout=5) as client:
        status = await client.request("status")
        assert status["daemon"]["pid"] == daemon.pid
        await client.subscribe()  # the events socket is CURVE too

    monkeypatch.setenv("VRAMCHAT_CONFIG", str(tmp_path / "stranger" / "config.toml"))
    with pytest.raises(DaemonNotRunning):
        await Client(server=server, server_public_key=curve_setup["server_key"], timeout=2).connect()

    # A client that skips CURVE gets nothing at all from the CURVE port.
    raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server)
    raw.send(b"\x80")
    assert raw.poll(1000) == 0
    raw.close()


def test_tcp_without_keys_refuses_to_start(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory("--no-load", "--tcp", f"127.0.0.1:{free_port_pair()}", start=False)
    daemon.start(wait=False)
    assert daemon.wait(30) != 0
    assert "vramchatd keys" in daemon.log()


def test_insecure_tcp_needs_tcp_and_says_so_loudly(daemon_factory: DaemonFactory) -> None:
    lone = daemon_factory("--no-load", "--insecure-tcp", start=False)
    lone.start(wait=False)
    assert lone.wait(30) == 2 and "needs --tcp" in lone.log()
    port = free_port_pair()
    plain = daemon_factory("--no-load", "--insecure-tcp", "--tcp", f"127.0.0.1:{port}")
    plain.wait_for_log("NO ENCRYPTION")
    asyncio.run(_plain_hello(port))


async def _plain_hello(port: int) -> None:
    import msgpack
    import zmq.asyncio

    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    await dealer.send(msgpack.packb({"id": "x", "type": "hello", "body": {"protocol": 1}}))
    reply = msgpack.unpackb(await asyncio.wait_for(dealer.recv(), 10))
    dealer.close()
    assert reply["ok"] is True
