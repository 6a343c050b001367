"""CURVE keys and client authorization for the optional TCP listener.

Layout, under <data dir>/curve (0700)::

    server.key          the server's public key: give it to clients
    server.key_secret   the server's key pair (0600): never leaves this machine
    authorized_keys/    one `.key` public key file per client allowed to connect

Authorization is by ZAP: an authenticator on the daemon's context answers every CURVE handshake,
and lets in only the keys found in authorized_keys/ at that moment, so adding or removing a
file takes effect on the next connection without a restart.
"""

from __future__ import annotations

import argparse
import logging
import stat
import sys
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from vramchat.shared import paths
from vramchat.shared.curve_client import (
    CLIENT_KEY_NAME,
    CurveKeyError,
    load_keypair,
    public_path,
    secret_path,
    write_keypair,
)
from vramchat.shared.paths import UnsafeDirectoryError, ensure_private_dir

log = logging.getLogger(__name__)

SERVER_KEY_NAME = "server"
AUTHORIZED_DIR = "authorized_keys"
# The ZAP domain of the daemon's CURVE sockets; the authenticator answers for this one only.
ZAP_DOMAIN = b"vramchat"


class CurveKeysMissing(CurveKeyError):
    pass


def keys_dir(data_dir: Path) -> Path:
    return data_dir / "curve"


def authorized_dir(directory: Path) -> Path:
    return directory / AUTHORIZED_DIR


def create_server_keys(directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write server.key and server.key_secret (0600) and an empty authorized_keys/ (0700)."""
    made = write_keypair(directory, SERVER_KEY_NAME, force=force)
    ensure_private_dir(authorized_dir(directory), 0o700)
    return made


def load_server_secret(directory: Path, endpoint: str | None = None) -> tuple[bytes, bytes]:
    """The server's (public, secret) keys; CurveKeysMissing says how to make them.

    `endpoint` is the configured TCP address, named in the error so the person knows why keys
    are wanted at all.
    """
    secret = secret_path(directory, SERVER_KEY_NAME)
    if not secret.exists():
        why = f"the TCP listener {endpoint} requires" if endpoint else "TCP requires"
        raise CurveKeysMissing(
            f"{why} CURVE keys, and {secret} does not exist. Create them with `vramchatd keys`, "
            f"then copy each client's public key into {authorized_dir(directory)}/. "
            "Plain TCP would let anyone on the network read and drive your chats."
        )
    mode = stat.S_IMODE(secret.stat().st_mode)
    if mode & 0o077:
        raise CurveKeyError(
            f"{secret} has mode {mode:04o}: other users can read the server's secret key. Fix it with `chmod 600 {secret}`"
        )
    return load_keypair(secret)


class AuthorizedKeys:
    """ZAP credentials provider: a key is allowed while its `.key` file is in the directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def keys(self) -> set[bytes]:
        """The z85 public keys listed now; unreadable files are skipped with a warning."""
        found: set[bytes] = set()
        for path in sorted(self.directory.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                log.warning("ignoring authorized key %s: %s", path, exc)
                continue
            found.add(public)
        return found

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator with the client's z85 public key."""
        allowed = key in self.keys()
        if not allowed:
            log.warning("refused a CURVE client with unknown public key %s", key.decode("ascii", "replace"))
        return allowed


def start_authenticator(context: zmq.Context, allowed_dir: Path) -> AsyncioAuthenticator:
    """Start ZAP on `context`, allowing only the keys in `allowed_dir`.

    Call from inside the running event loop, before binding any CURVE socket: without a ZAP
    handler libzmq lets every CURVE client in. Stop it (`.stop()`) after closing the sockets.
    """
    ensure_private_dir(allowed_dir, 0o700)
    authenticator = AsyncioAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=AuthorizedKeys(allowed_dir))
    return authenticator


def make_curve_server(socket: zmq.Socket, public: bytes, secret: bytes) -> None:
    """Make `socket` a CURVE server checked by the authenticator; call before bind()."""
    socket.curve_server = True
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.zap_domain = ZAP_DOMAIN


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `vramchatd keys` (the data dir comes from the common --data-dir)."""
    parser.add_argument(
        "--force", action="store_true", help="replace the server key pair (every client must then get the new server.key)"
    )


def keys_command(args: argparse.Namespace) -> int:
    """`vramchatd keys`: create the server keys if missing, and say how to authorize a client."""
    directory = keys_dir(paths.data_dir(getattr(args, "data_dir", None)))
    force = getattr(args, "force", False)
    try:
        if force or not secret_path(directory, SERVER_KEY_NAME).exists():
            create_server_keys(directory, force=force)
            print(f"created a new server key pair in {directory}")
        public, _ = load_server_secret(directory)
        allowed = authorized_dir(directory)
        ensure_private_dir(allowed, 0o700)
    except (CurveKeyError, UnsafeDirectoryError) as exc:
        print(f"vramchatd: {exc}", file=sys.stderr)
        return 1
    clients = sorted(allowed.glob("*.key"))
    print(f"server public key: {public_path(directory, SERVER_KEY_NAME)}")
    print(f"                   {public.decode()}")
    print(f"server secret key: {secret_path(directory, SERVER_KEY_NAME)} (keep it private)")
    print(f"authorized clients ({len(clients)}) in {allowed}/:")
    for client in clients:
        print(f"  {client.name}")
    print(
        "\nTo let a client in over TCP:\n"
        f"  1. copy {public_path(directory, SERVER_KEY_NAME)} to the client: it proves it talks to this daemon;\n"
        f"  2. copy the client's public key, {CLIENT_KEY_NAME}.key in its vramchat config dir under curve/\n"
        "     (made on its first TCP connection), into\n"
        f"     {allowed}/<any-name>.key\n"
        "  It applies to the next connection; no restart. Delete the file to revoke the client.\n"
        "  Never copy a .key_secret file."
    )
    return 0
