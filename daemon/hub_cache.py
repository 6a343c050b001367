"""The Hugging Face hub cache as huggingface_hub lays it out, and fetching one file into it.

`models--ORG--NAME/blobs/<sha256>` holds each file once, `snapshots/<commit>/<path>` links to it
and `refs/<branch>` names the commit, so llama.cpp's `-hf`, huggingface_hub and vramchat share
every byte. A file arrives in `blobs/<sha256>.incomplete`, which vramchat keeps across a daemon
restart (even SIGKILL: huggingface_hub deletes its own partial files) and resumes with a Range
request; it becomes the blob only once its sha256 is the Hub's, and a snapshot links only blobs.
Everything here blocks: the daemon calls it from a thread (daemon/downloads.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import constants, get_session, hf_hub_url
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers

from vramchat.shared import __version__
from vramchat.shared.units import format_bytes

if TYPE_CHECKING:
    from vramchat.daemon.downloads import PullFile

log = logging.getLogger(__name__)

# A transfer that breaks or stalls (no byte for HF_HUB_DOWNLOAD_TIMEOUT seconds, huggingface_hub's
# own read timeout) is tried again from the byte it stopped at, after these pauses; a try that
# moved bytes starts the count again.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)
# Chunks waiting for the hasher: 64 KiB as they come from the network, HASH_CHUNK as they are
# read back from a partial file; a few MiB at most.
HASH_QUEUE = 64
HASH_CHUNK = 256 * 1024
# Server answers worth trying again; any other failure is reported at once.
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class FetchError(Exception):
    """The file cannot be fetched or was refused; the message says what to do."""


class Halted(Exception):
    """The download was cancelled, or the daemon is stopping: the thread gives up at the next chunk."""


@dataclass(frozen=True)
class RepoCache:
    """One repo's folder in the hub cache."""

    cache_dir: Path
    repo: str

    @property
    def folder(self) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=self.repo, repo_type="model")

    def blob(self, sha256: str) -> Path:
        return self.folder / "blobs" / sha256

    def partial(self, sha256: str) -> Path:
        return self.folder / "blobs" / f"{sha256}.incomplete"

    def lock(self, sha256: str) -> FileLock:
        """huggingface_hub's own lock on the blob, so neither fetches a file the other is fetching."""
        path = self.cache_dir / ".locks" / self.folder.name / f"{sha256}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path, mode=0o664)

    def snapshot(self, commit: str, path: str) -> Path:
        return self.folder / "snapshots" / commit / path

    def on_disk(self, file: PullFile) -> int:
        """The bytes of `file` already here: the whole blob, else what its partial file holds."""
        if self.blob(file.sha256).is_file():
            return file.size_bytes
        try:
            return min(self.partial(file.sha256).stat().st_size, file.size_bytes)
        except FileNotFoundError:
            return 0

    def link(self, commit: str, ref: str | None, files: list[PullFile]) -> None:
        """Put the verified blobs in the snapshot (relative links, each replaced atomically) and name
        the commit in refs/<ref>, as huggingface_hub does."""
        for file in files:
            target = self.snapshot(commit, file.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            os.symlink(os.path.relpath(self.blob(file.sha256), target.parent), temporary)
            os.replace(temporary, target)
        if ref and ref != commit:
            ref_path = self.folder / "refs" / ref
            ref_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = ref_path.with_name(f".{ref_path.name}.{uuid.uuid4().hex[:8]}")
            temporary.write_text(commit)
            os.replace(temporary, ref_path)

    def remove_partials(self, files: list[PullFile]) -> None:
        for file in files:
            self.partial(file.sha256).unlink(missing_ok=True)


def room_margin(left: int) -> int:
    """Spare bytes a pull wants beyond what it fetches: 1%, plus up to 512 MiB (a tenth of a small pull)."""
    return left // 100 + min(512 * 1024 * 1024, left // 10)


def check_room(cache_dir: Path, left: int, what: str) -> None:
    """Refuse, with the figures, a pull whose `left` bytes (plus the margin) the disk cannot hold."""
    if left <= 0:
        return
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    needed = left + room_margin(left)
    if needed > free:
        raise FetchError(
            f"not enough disk space for {what}: {format_bytes(left)} left to fetch plus a margin of "
            f"{format_bytes(needed - left)} needs {format_bytes(needed)}, and the disk holding {cache_dir} has "
            f"{format_bytes(free)} free; free some space, or point HF_HUB_CACHE at a bigger disk"
        )


def _status_error(status: int, repo: str, path: str) -> FetchError:
    if status == 401:
        return FetchError(
            f"the Hub wants a token for {repo} (HTTP 401): it is gated or private. Accept its terms on its page, then "
            "give the daemon a token (HF_TOKEN in its environment, or `hf auth login` as its user) and pull again"
        )
    if status == 403:
        return FetchError(
            f"the Hub refused {repo} to this token (HTTP 403): accept the repo's terms on its page with the account "
            "the token belongs to, then pull again"
        )
    if status == 404:
        return FetchError(f"{path} is no longer in {repo} (HTTP 404); list the repo again with `vramchat pull {repo} --list`")
    return FetchError(f"the Hub answered HTTP {status} for {repo}/{path}; try again later")


class Hasher:
    """The sha256 of a file's bytes, computed in a thread of its own: on another core it keeps up
    with a fast link instead of slowing it down (hashlib lets go of the GIL)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_QUEUE)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def update(self, chunk: bytes) -> None:
        self._chunks.put(chunk)

    def hexdigest(self) -> str:
        """Once every byte given is hashed."""
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)


class Retryable(Exception):
    """A failure a later try may not meet: a 429 or 5xx answer, or one that ended early."""


@dataclass
class FileFetch:
    """Fetching one file of `repo` at `commit` into the cache, resuming from its partial file."""

    cache: RepoCache
    repo: str
    commit: str
    file: PullFile
    halt: threading.Event
    verifying: Callable[[bool], None]  # tells the download whether bytes are being checked rather than fetched
    hasher: Hasher = field(init=False)  # of the file's bytes so far, from the first

    def run(self) -> None:
        """Bring the file into blobs/<sha256>, verified; raises FetchError or Halted."""
        blob = self.cache.blob(self.file.sha256)
        if not blob.is_file():  # a blob is only ever a verified file
            lock = self.cache.lock(self.file.sha256)
            while True:
                try:
                    lock.acquire(timeout=1)
                    break
                except Timeout:
                    if self.halt.is_set():
                        raise Halted from None
            partial = self.cache.partial(self.file.sha256)
            try:
                if not blob.is_file():  # another process may have fetched it meanwhile
                    self._fetch(blob)
            finally:
                if partial.is_file() and partial.stat().st_size == 0:  # refused at once: nothing to resume from
                    partial.unlink()
                lock.release()
        self.file.done_bytes = self.file.size_bytes

    def _fetch(self, blob: Path) -> None:
        """Into the partial file from where it ends, then, verified, into `blob`."""
        partial = self.cache.partial(self.file.sha256)
        partial.parent.mkdir(parents=True, exist_ok=True)
        self.hasher = Hasher()
        try:
            self._fill(partial)
            self.verifying(True)
            digest = self.hasher.hexdigest()
        finally:
            self.hasher.close()
        if digest != self.file.sha256:
            partial.unlink(missing_ok=True)
            self.file.done_bytes = 0
            raise FetchError(
                f"{self.file.path} from {self.repo} does not match the Hub's sha256 (expected {self.file.sha256}, got "
                f"{digest}); the file was removed. Pull again; if it happens again, something between "
                "you and the Hub (a proxy, HF_ENDPOINT) serves a damaged file"
            )
        os.replace(partial, blob)
        self.verifying(False)

    def _fill(self, partial: Path) -> None:
        """Append to the partial file until it holds the whole file, trying again after a break or a stall."""
        with partial.open("ab") as out:
            if out.tell() > self.file.size_bytes:
                out.truncate(0)
            self.file.done_bytes = out.tell()
            self._hash_prefix(partial)
            failures = 0
            while self.file.done_bytes < self.file.size_bytes:
                before = self.file.done_bytes
                try:
                    self._stream(out)
                except (httpx2.TransportError, Retryable) as exc:
                    failures = 1 if self.file.done_bytes > before else failures + 1
                    if failures > len(RETRY_DELAYS_S):
                        raise FetchError(
                            f"the transfer of {self.file.path} broke or stalled {failures} times in a row ({exc}); "
                            f"{format_bytes(self.file.done_bytes)} are kept: pull again to resume from there"
                        ) from None
                    delay = RETRY_DELAYS_S[failures - 1]
                    log.warning("%s: %s at byte %d; trying again in %.0f s", self.file.path, exc, self.file.done_bytes, delay)
                    if self.halt.wait(delay):
                        raise Halted from None

    def _hash_prefix(self, partial: Path) -> None:
        """Hash what an earlier run left on disk, so that the rest can be hashed as it arrives."""
        if self.file.done_bytes == 0:
            return
        self.verifying(True)
        with partial.open("rb") as earlier:
            while chunk := earlier.read(min(HASH_CHUNK, self.file.done_bytes - earlier.tell())):
                if self.halt.is_set():
                    raise Halted
                self.hasher.update(chunk)
        self.verifying(False)

    def _stream(self, out: BinaryIO) -> None:
        """One GET from `done_bytes` on, appended to `out` and hashed as it comes."""
        url = hf_hub_url(self.repo, self.file.path, revision=self.commit)
        # identity: a Range counts the file's own bytes, which a compressed answer would not.
        headers = {**hub_headers(), "Accept-Encoding": "identity", "Range": f"bytes={self.file.done_bytes}-"}
        timeout = httpx2.Timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT, connect=constants.HF_HUB_ETAG_TIMEOUT)
        with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
            if response.status_code in TRANSIENT_STATUS:
                raise Retryable(f"HTTP {response.status_code}")
            if response.status_code not in (200, 206):
                raise _status_error(response.status_code, self.repo, self.file.path)
            if response.status_code == 200 and self.file.done_bytes:  # the server ignored the Range
                out.truncate(0)
                self.hasher.close()
                self.file.done_bytes, self.hasher = 0, Hasher()
            for chunk in response.iter_raw():
                if self.halt.is_set():
                    raise Halted
                out.write(chunk)
                self.hasher.update(chunk)
                self.file.done_bytes += len(chunk)
                if self.file.done_bytes > self.file.size_bytes:
                    out.truncate(0)
                    raise FetchError(
                        f"the Hub sent more of {self.file.path} than its listing says ({self.file.size_bytes} bytes); "
                        "the repo may have changed: list it again and pull again"
                    )
        if self.file.done_bytes < self.file.size_bytes:
            raise Retryable(f"the answer ended at byte {self.file.done_bytes}")


def hub_headers() -> dict[str, str]:
    """huggingface_hub's headers (the token of HF_TOKEN or `hf auth login`), naming vramchat as the client."""
    return build_hf_headers(library_name="vramchat", library_version=__version__)
