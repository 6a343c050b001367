"""CURVE key files (ZeroMQ's certificate format) and the client side of a CURVE connection.

A key pair is two files made by zmq.auth.create_certificates: `NAME.key` holds the public key
and is what gets copied to the other side; `NAME.key_secret` holds both keys and never leaves
the machine. Both are written 0600 inside a 0700 directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from vramchat.shared.paths import ensure_private_dir

CLIENT_KEY_NAME = "client"
KEY_MODE = 0o600


class CurveKeyError(Exception):
    pass


def key_dir(config_dir: Path) -> Path:
    """Where a client keeps its key pair: <config dir>/curve."""
    return config_dir / "curve"


def public_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.key"


def secret_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.key_secret"


def write_keypair(directory: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Create NAME.key and NAME.key_secret in `directory` (made 0700); return (public, secret).

    Refuses to replace an existing pair unless `force`: a new server key locks out every
    client, a new client key needs authorizing again. The files are written in a private
    temporary directory and renamed into place, so a secret is never readable by others, not
    even for a moment, whatever the umask.
    """
    ensure_private_dir(directory, 0o700)
    public, secret = public_path(directory, name), secret_path(directory, name)
    if not force and (public.exists() or secret.exists()):
        raise CurveKeyError(f"{secret} already exists; pass --force to replace it (clients that trust it will be locked out)")
    staging = Path(tempfile.mkdtemp(prefix=".new-keys-", dir=directory))
    try:
        made = [Path(p) for p in zmq.auth.create_certificates(staging, name)]
        for path in made:
            path.chmod(KEY_MODE)
        os.replace(made[1], secret)
        os.replace(made[0], public)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return public, secret


def load_keypair(secret_file: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `.key_secret` file."""
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE key {secret_file}: {exc}") from None
    if secret is None:
        raise CurveKeyError(f"{secret_file} holds no secret key: it is a public `.key` file")
    return public, secret


def load_public_key(source: str | os.PathLike[str]) -> bytes:
    """A public key given as its 40-character z85 text or as the path of a `.key` file."""
    text = os.fspath(source)
    if len(text) == 40 and not Path(text).exists():
        try:
            z85.decode(text)
        except (ValueError, KeyError):
            raise CurveKeyError(f"{text!r} is neither a z85 public key nor a key file") from None
        return text.encode()
    try:
        public, _ = zmq.auth.load_certificate(text)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE public key {text}: {exc}") from None
    return public


def client_keys(config_dir: Path) -> tuple[bytes, bytes]:
    """This client's (public, secret) keys, creating the pair on first use."""
    directory = key_dir(config_dir)
    secret = secret_path(directory, CLIENT_KEY_NAME)
    if not secret.exists():
        write_keypair(directory, CLIENT_KEY_NAME)
    return load_keypair(secret)


def apply_client_curve(socket: zmq.Socket, server_public_key: bytes, client_public: bytes, client_secret: bytes) -> None:
    """Make `socket` a CURVE client of the server with that public key; call before connect()."""
    socket.curve_serverkey = server_public_key
    socket.curve_publickey = client_public
    socket.curve_secretkey = client_secret
