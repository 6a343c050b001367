"""A Hugging Face Hub on loopback, serving repos from a directory (tests/hub_repos.py makes them).

The tests cannot reach huggingface.co, so `HubStandin` answers the routes huggingface_hub uses
(model info, the tree listing, resolve with HEAD and Range) from a directory of repos
(root/OWNER/NAME/...). Point huggingface_hub at it with HF_ENDPOINT and a private HF_HOME, set
before huggingface_hub is imported in that process: `env()` gives them for child processes, and
in this process pass `endpoint=` to vramchat.shared.hub.

It counts the bytes it serves per file (`bytes_served`), and can throttle (`throttle`), gate a
repo behind a token (`gate`), and serve a file with one wrong byte while advertising its true
sha256 (`corrupt`). The answers follow huggingface_hub 2.x (hf_api.py, file_download.py,
utils/_http.py: hf_raise_for_status reads X-Error-Code). One difference: resolve serves an LFS
file itself, where the Hub redirects to a CDN.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from hub_repos import GATED_REPO, GATED_TOKEN

CHUNK = 64 << 10
LFS_THRESHOLD = 10 << 20  # .gguf files and anything bigger go to LFS, as the Hub's default .gitattributes has it
DATE = "2025-01-01T00:00:00.000Z"
# What a developer's environment may hold that would send the tests to the real Hub, or with a token.
HF_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HOME")


_SHA256: dict[tuple[str, int, int], str] = {}


def sha256_of(path: Path) -> str:
    """The file's sha256 (its LFS oid), remembered while the file is unchanged."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """What git holds for an LFS file: the Hub's oid of such a file is this text's."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of a repo as the Hub describes it."""

    path: str
    size: int
    oid: str  # git blob id (of the LFS pointer for an LFS file)
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid

    def tree(self, commit: str, expand: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.sha256:
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        if expand:
            item["lastCommit"] = {"id": commit, "title": "Upload", "date": DATE}
        return item

    def sibling(self, blobs: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"rfilename": self.path}
        if blobs:
            item.update(size=self.size, blobId=self.oid)
            if self.sha256:
                item["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return item

    @classmethod
    def of(cls, path: Path, relative: str) -> Entry:
        size = path.stat().st_size
        if path.suffix == ".gguf" or size > LFS_THRESHOLD:
            sha256 = sha256_of(path)
            return cls(relative, size, git_oid(lfs_pointer(sha256, size)), sha256)
        return cls(relative, size, git_oid(path.read_bytes()), None)


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": message}, status=status, headers={"X-Error-Code": code, "X-Error-Message": message, **headers}
    )


class HubStandin:
    """The Hub's routes on 127.0.0.1, served from `root`, in a thread of its own (so synchronous tests,
    and the daemons and CLIs they start, can all use it)."""

    def __init__(self, root: Path, *, tree_page_size: int = 1000, tree_expanded_page_size: int = 50) -> None:
        self.root = root
        self.tree_page_size, self.tree_expanded_page_size = tree_page_size, tree_expanded_page_size
        self.bytes_per_second: float | None = None
        self.gated: dict[str, str] = {}  # repo -> the token that opens it
        self.corrupted: dict[tuple[str, str], int] = {}  # (repo, path) -> the offset of the wrong byte
        self.served: Counter[tuple[str, str]] = Counter()  # (repo, path) -> bytes sent by resolve GETs
        self.requests: list[tuple[str, str, str | None]] = []  # method, path and query, Range
        self.port = 0
        self.hf_home = Path(tempfile.mkdtemp(prefix="vc-hf-"))  # huggingface_hub's cache and token file
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hub-standin", daemon=True)
        self._runner: web.AppRunner | None = None

    # --- what tests use -----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def variables(self) -> dict[str, str]:
        """What points huggingface_hub here: HF_ENDPOINT, and a private HF_HOME (its cache and token file)."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HOME": str(self.hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def env(self, token: str | None = None) -> dict[str, str]:
        """This process's environment with `variables()` and no Hub token but `token`, for a child
        process (huggingface_hub reads them when it is imported)."""
        env = {k: v for k, v in os.environ.items() if k not in HF_VARIABLES}
        env.update(self.variables())
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def throttle(self, bytes_per_second: float | None) -> None:
        """Serve file bodies at this rate from now on (in flight too); None: as fast as possible."""
        self.bytes_per_second = bytes_per_second

    def gate(self, repo: str, token: str) -> None:
        """Files of `repo` need `Authorization: Bearer <token>`: 401 without one, 403 with another."""
        self.gated[repo] = token

    def corrupt(self, repo: str, path: str, offset: int | None = None) -> None:
        """Serve `path` with the byte at `offset` (default: the middle) flipped; the sha256 advertised stays true."""
        self.corrupted[(repo, path)] = (self.root / repo / path).stat().st_size // 2 if offset is None else offset

    def bytes_served(self, repo: str | None = None, path: str | None = None) -> int:
        return sum(n for (r, p), n in self.served.items() if repo in (None, r) and path in (None, p))

    def repo_bytes(self, repo: str) -> int:
        return sum(entry.size for entry in self.entries(repo))

    def entries(self, repo: str) -> list[Entry]:
        folder = self.root / repo
        return [Entry.of(p, p.relative_to(folder).as_posix()) for p in sorted(folder.rglob("*")) if p.is_file()]

    def commit(self, repo: str) -> str:
        """A stable commit id for the repo's current files."""
        files = sorted(self.root.joinpath(repo).rglob("*"))
        stamp = "".join(f"{p.relative_to(self.root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n" for p in files if p.is_file())
        return hashlib.sha1(stamp.encode()).hexdigest()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> HubStandin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        shutil.rmtree(self.hf_home, ignore_errors=True)

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _start(self) -> None:
        app = web.Application()
        repo = "/{owner}/{name}"
        app.router.add_get("/api/models" + repo, self._model_info)
        app.router.add_get("/api/models" + repo + "/revision/{rev}", self._model_info)
        app.router.add_get("/api/models" + repo + "/tree/{rev}", self._tree)
        app.router.add_get("/api/models" + repo + "/tree/{rev}/{path:.+}", self._tree)
        app.router.add_route("*", repo + "/resolve/{rev}/{path:.+}", self._resolve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    # --- routes -------------------------------------------------------------------------------

    def _check(self, request: web.Request) -> tuple[str, str] | web.Response:
        """The repo and its commit, or the error the Hub gives for a missing repo or revision."""
        self.requests.append((request.method, request.path_qs, request.headers.get("Range")))
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        if not (self.root / repo).is_dir():
            return _error(401, "RepoNotFound", "Repository not found")
        commit = self.commit(repo)
        if request.match_info.get("rev", "main") not in ("main", commit):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {request.match_info['rev']}")
        return repo, commit

    async def _model_info(self, request: web.Request) -> web.Response:
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        repo, commit = checked
        entries = self.entries(repo)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24],
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": commit,
            "lastModified": DATE,
            "createdAt": DATE,
            "private": False,
            "gated": "manual" if repo in self.gated else False,
            "disabled": False,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": [e.sibling("blobs" in request.query) for e in entries],
            "usedStorage": sum(e.size for e in entries),
        }
        if expand := request.query.getall("expand", []):
            info = {k: v for k, v in info.items() if k in (*expand, "_id", "id")}
        return web.json_response(info)

    async def _tree(self, request: web.Request) -> web.Response:
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        repo, commit = checked
        under = request.match_info.get("path", "").strip("/")
        if under and not (self.root / repo / under).is_dir():
            return _error(404, "EntryNotFound", f"{under} does not exist on main", **{"X-Repo-Commit": commit})
        recursive, expand = (request.query.get(k, "false").lower() == "true" for k in ("recursive", "expand"))
        items: list[dict[str, Any]] = []
        folders: set[str] = set()
        for entry in self.entries(repo):
            inside = entry.path[len(under) + 1 :] if under else entry.path
            if under and not entry.path.startswith(under + "/"):
                continue
            parts = inside.split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add("/".join([*([under] if under else []), *parts[:depth]]))
            if recursive or len(parts) == 1:
                items.append(entry.tree(commit, expand))
        items += [{"type": "directory", "oid": git_oid(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        size = self.tree_expanded_page_size if expand else self.tree_page_size
        start = int(request.query.get("cursor", "0"))
        headers = {}
        if start + size < len(items):
            query = urlencode({"recursive": str(recursive).lower(), "expand": str(expand).lower(), "cursor": start + size})
            headers["Link"] = f'<{self.endpoint}{request.path}?{query}>; rel="next"'
        return web.json_response(items[start : start + size], headers=headers)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        checked = self._check(request)
        if isinstance(checked, web.Response):
            return checked
        repo, commit = checked
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if repo in self.gated:
            given = request.headers.get("Authorization")
            if given != f"Bearer {self.gated[repo]}":
                status = 403 if given else 401
                why = "Your request to access this repo was not approved" if given else "You must be authenticated"
                return _error(status, "GatedRepo", f"Access to model {repo} is restricted. {why}.")
        path = request.match_info["path"]
        file = self.root / repo / path
        if ".." in path.split("/") or not file.is_file():
            return _error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": commit})
        entry = Entry.of(file, path)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{file.name}"',
        }
        if entry.sha256:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size - 1, 200
        if (wanted := _parse_range(request.headers.get("Range"), entry.size)) is not None:
            start, end = wanted
            if start >= entry.size or start > end:
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        headers["Content-Length"] = str(end - start + 1)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "GET":
            await self._send(response, file, start, end + 1, (repo, path))
        return response

    async def _send(self, response: web.StreamResponse, file: Path, start: int, stop: int, key: tuple[str, str]) -> None:
        """File bytes [start, stop), throttled and corrupted as set, counted as they go out."""
        wrong = self.corrupted.get(key)
        with file.open("rb") as handle:
            handle.seek(start)
            position = start
            while position < stop:
                rate = self.bytes_per_second
                chunk = bytearray(handle.read(min(CHUNK if rate is None else max(1024, int(rate / 20)), stop - position)))
                if wrong is not None and position <= wrong < position + len(chunk):
                    chunk[wrong - position] ^= 0xFF
                try:
                    await response.write(bytes(chunk))
                except (ConnectionError, RuntimeError):  # the client went away
                    return
                self.served[key] += len(chunk)
                position += len(chunk)
                if rate is not None:
                    await asyncio.sleep(len(chunk) / rate)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, last capped at the file's end; None to send the whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].partition("-")
    try:
        if not first:
            return max(0, size - int(last)), size - 1
        return int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None


def serve(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    """A started stand-in over `root`, with GATED_REPO behind GATED_TOKEN, and this process's
    environment pointed at it (child processes inherit it); stopped afterwards."""
    with HubStandin(root) as standin:
        standin.gate(GATED_REPO, GATED_TOKEN)
        for name in HF_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in standin.variables().items():
            monkeypatch.setenv(name, value)
        yield standin
