"""The HTTP API's bearer key: one secret file in the data dir, created on first use with mode 0600."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

KEY_FILE = "api-key"


class ApiKeyError(Exception):
    pass


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def read_or_create(data_dir: Path) -> str:
    """The key, made on the first call: `vramchat api-key` and the daemon agree without a step."""
    path = key_path(data_dir)
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        key = "vc-" + secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile: use theirs
            return read_or_create(data_dir)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ApiKeyError(f"{path} has mode {mode:04o}: other users can read the API key. Fix it with `chmod 600 {path}`")
    key = path.read_text().strip()
    if not key:
        raise ApiKeyError(f"{path} is empty: delete it, and `vramchat api-key` makes a new key")
    return key
