"""CURVE keys and the ZAP authenticator, over real tcp://127.0.0.1 sockets."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from vramchat.daemon.curve import (
    CurveKeysMissing,
    authorized_dir,
    create_server_keys,
    keys_command,
    load_server_secret,
    make_curve_server,
    start_authenticator,
)
from vramchat.shared.curve_client import CurveKeyError, apply_client_curve, client_keys, key_dir, load_public_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_keys_are_private(tmp_path: Path) -> None:
    public, secret = create_server_keys(tmp_path / "curve")
    assert (public.name, secret.name) == ("server.key", "server.key_secret")
    assert mode(public) == 0o600 and mode(secret) == 0o600
    assert mode(tmp_path / "curve") == 0o700
    assert mode(authorized_dir(tmp_path / "curve")) == 0o700
    assert [p.name for p in (tmp_path / "curve").iterdir() if p.name.startswith(".")] == []


def test_server_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    directory = tmp_path / "curve"
    create_server_keys(directory)
    first = load_server_secret(directory)
    with pytest.raises(CurveKeyError, match="--force"):
        create_server_keys(directory)
    assert load_server_secret(directory) == first
    create_server_keys(directory, force=True)
    assert load_server_secret(directory)[0] != first[0]


def test_client_keys_are_made_once_and_private(tmp_path: Path) -> None:
    public, secret = client_keys(tmp_path)
    directory = key_dir(tmp_path)
    assert mode(directory / "client.key") == 0o600
    assert mode(directory / "client.key_secret") == 0o600
    assert mode(directory) == 0o700
    assert client_keys(tmp_path) == (public, secret)
    assert load_public_key(directory / "client.key") == public
    assert load_public_key(public.decode()) == public


def test_tcp_without_keys_is_refused_with_a_way_out(tmp_path: Path) -> None:
    with pytest.raises(CurveKeysMissing) as caught:
        load_server_secret(tmp_path / "curve", "tcp://0.0.0.0:5555")
    message = str(caught.value)
    assert "tcp://0.0.0.0:5555" in message
    assert "vramchatd keys" in message


def test_a_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    _, secret = create_server_keys(tmp_path / "curve")
    secret.chmod(0o644)
    with pytest.raises(CurveKeyError, match="chmod 600"):
        load_server_secret(tmp_path / "curve")


def test_keys_command_creates_keys_and_lists_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert keys_command(argparse.Namespace(data_dir=str(data), force=False)) == 0
    public, _ = load_server_secret(data / "curve")
    client_keys(tmp_path / "laptop")
    shutil.copy(key_dir(tmp_path / "laptop") / "client.key", authorized_dir(data / "curve") / "laptop.key")
    assert keys_command(argparse.Namespace(data_dir=str(data), force=False)) == 0
    out = capsys.readouterr().out
    assert public.decode() in out
    assert "laptop.key" in out
    assert load_server_secret(data / "curve")[0] == public


class Server:
    """A CURVE ROUTER that answers b"ping" with b"pong" and records who it heard."""

    def __init__(self, context: zmq.asyncio.Context, keys: Path) -> None:
        public, secret = load_server_secret(keys)
        self.public = public
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 0
        make_curve_server(self.socket, public, secret)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.heard: list[bytes] = []
        self.task = asyncio.create_task(self.serve())

    async def serve(self) -> None:
        while True:
            identity, body = await self.socket.recv_multipart()
            self.heard.append(body)
            await self.socket.send_multipart([identity, b"pong"])


@pytest.fixture
async def curve_setup(tmp_path: Path) -> AsyncIterator[tuple[zmq.asyncio.Context, Server, Path]]:
    keys = tmp_path / "curve"
    create_server_keys(keys)
    context = zmq.asyncio.Context()
    authenticator = start_authenticator(context, authorized_dir(keys))
    server = Server(context, keys)
    yield context, server, tmp_path
    server.task.cancel()
    authenticator.stop()
    context.destroy(linger=0)


def connect(context: zmq.asyncio.Context, server: Server, config_dir: Path) -> zmq.asyncio.Socket:
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    apply_client_curve(socket, server.public, *client_keys(config_dir))
    socket.connect(server.endpoint)
    return socket


async def answered(socket: zmq.asyncio.Socket, timeout: float) -> bytes | None:
    """The reply to a ping, or None. A refused DEALER may have no pipe left, so send can block too."""

    async def exchange() -> bytes:
        await socket.send(b"ping")
        return await socket.recv()

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except TimeoutError:
        return None


async def test_only_authorized_client_keys_get_a_reply(curve_setup: tuple[zmq.asyncio.Context, Server, Path]) -> None:
    context, server, root = curve_setup
    client_keys(root / "alice")
    shutil.copy(key_dir(root / "alice") / "client.key", authorized_dir(root / "curve") / "alice.key")

    alice = connect(context, server, root / "alice")
    mallory = connect(context, server, root / "mallory")
    assert await answered(alice, timeout=5) == b"pong"
    assert await answered(mallory, timeout=1) is None
    assert server.heard == [b"ping"]


async def test_removing_a_key_file_revokes_new_connections(curve_setup: tuple[zmq.asyncio.Context, Server, Path]) -> None:
    context, server, root = curve_setup
    client_keys(root / "bob")
    listed = authorized_dir(root / "curve") / "bob.key"
    shutil.copy(key_dir(root / "bob") / "client.key", listed)
    assert await answered(connect(context, server, root / "bob"), timeout=5) == b"pong"

    listed.unlink()
    assert await answered(connect(context, server, root / "bob"), timeout=1) is None
    assert server.heard == [b"ping"]
