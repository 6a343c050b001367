"""A GGUF file's header read over HTTP Range requests, so a model on the Hub is inspected without
downloading its weights.

The header (magic, version, counts, every key/value, every tensor's name, shape, type and
offset) is all shared/gguf.py needs, and it is usually 1-10 MB of a multi-GB file. `header_length`
walks just far enough to find where it ends; `read_header` fetches the file's first bytes, and more
while the header goes on; `sparse_copy` writes them into a sparse file of the remote file's full
size, so `inspect_gguf` reads it as it would read the whole file on disk.
"""

from __future__ import annotations

import struct
from pathlib import Path

from huggingface_hub import get_session
from huggingface_hub.utils import hf_raise_for_status

from vramchat.shared.gguf import GGUFError

# What the first request asks for: a small vocabulary's whole header (each further read doubles
# what is held), and a later shard's, which holds no vocabulary. On the Hub a request costs two
# round trips (resolve, then the CDN), more than the bytes.
FIRST_READ = 2 << 20
SHARD_READ = 256 << 10
LIMIT = 512 << 20  # no real header is this big: a file claiming one is damaged
TIMEOUT = 30.0
# GGUF value types (gguf's GGUFValueType) -> size in bytes; STRING and ARRAY are walked instead.
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Short(Exception):
    """The bytes held end before the header does."""


class _Walker:
    def __init__(self, data: bytes | bytearray, order: str) -> None:
        self.data, self.pos = memoryview(data), 0
        self.u32, self.u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def number(self, size: int) -> int:
        if self.pos + size > len(self.data):
            raise _Short
        value = (self.u32 if size == 4 else self.u64).unpack_from(self.data, self.pos)[0]
        self.pos += size
        return int(value)

    def skip(self, size: int) -> None:
        self.pos += size
        if self.pos > len(self.data):
            raise _Short

    def value(self, kind: int) -> None:
        if kind == _STRING:
            self.skip(self.number(8))
        elif kind == _ARRAY:
            item, count = self.number(4), self.number(8)
            if item in _SIZES:
                self.skip(count * _SIZES[item])
            else:
                for _ in range(count):
                    self.value(item)
        elif kind in _SIZES:
            self.skip(_SIZES[kind])
        else:
            raise GGUFError(f"unknown GGUF value type {kind}: the file is damaged, or newer than this vramchat reads")


def header_length(data: bytes | bytearray) -> int | None:
    """Where the header in `data` (a file's first bytes) ends, or None if it ends later than `data`
    does. Raises GGUFError for what is not a GGUF header."""
    if len(data) < 24:
        return None
    if bytes(data[:4]) != b"GGUF":
        raise GGUFError("it does not start with GGUF: it is not a GGUF model file")
    order = "<" if struct.unpack_from("<I", data, 4)[0] < 0x10000 else ">"  # big-endian files exist
    walker = _Walker(data, order)
    walker.skip(4)
    version = walker.number(4)
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = walker.number(8), walker.number(8)
    try:
        for _ in range(n_kv):
            walker.skip(walker.number(8))  # the key
            walker.value(walker.number(4))
        for _ in range(n_tensors):
            walker.skip(walker.number(8))  # the name
            walker.skip(8 * walker.number(4) + 4 + 8)  # dimensions, type, offset
    except _Short:
        return None
    return walker.pos


def _fetch(url: str, headers: dict[str, str], start: int, stop: int) -> bytes:
    """Bytes [start, stop) of `url`, by one Range request (a server ignoring Range sends the whole
    file: only what is needed is read of it)."""
    with get_session().stream(
        "GET", url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"}, follow_redirects=True, timeout=TIMEOUT
    ) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        skip = start if response.status_code == 200 else 0
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= skip + stop - start:
                break
        return bytes(data[skip : skip + stop - start])


def read_header(url: str, size: int, headers: dict[str, str], first: int = FIRST_READ) -> bytes:
    """The first bytes of the file at `url` (`size` bytes long), through the end of its GGUF header;
    the first request asks for `first` bytes.

    Raises GGUFError for a file that is not a GGUF or ends inside its header; huggingface_hub's
    errors (gated, not found) and httpx2's (unreachable) come through as they are."""
    held = bytearray()
    while True:
        want = min(size, max(first, 2 * len(held)), LIMIT)
        if want <= len(held):
            raise GGUFError(f"its header does not end within its first {len(held)} bytes: the file is damaged")
        held += _fetch(url, headers, len(held), want)
        if (end := header_length(held)) is not None:
            return bytes(held[:end])


def sparse_copy(path: Path, header: bytes, size: int) -> Path:
    """A file of `size` bytes at `path` holding `header` and a hole after it, which costs no disk."""
    with path.open("wb") as handle:
        handle.write(header)
        handle.truncate(size)
    return path
