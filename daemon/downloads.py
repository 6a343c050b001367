"""Pulls from the Hugging Face Hub, done by the daemon: queued, one at a time, resumable, verified.

A pull is a Download: the files of one quantization at one commit. The daemon works through
them in order in a supervised task, so closing the client or the SSH session stops none; keeps
the queue in <data dir>/downloads.json, so a restarted daemon (even after SIGKILL) goes on by
itself from the bytes on disk; and publishes each one's view as a `download` event on every
change of state, and at most every PROGRESS_INTERVAL_S while bytes move. The bytes move, are
hashed and land in the hub cache in a thread (hub_cache.py); events go out from the event loop.
huggingface_hub and its HTTP stack take 0.1 s to import: the first pull imports them (with
hub_cache.py and shared/hub.py), not every start of the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vramchat.daemon.events import EventBus
from vramchat.daemon.telemetry import TelemetrySampler
from vramchat.shared import paths
from vramchat.shared.config import Config
from vramchat.shared.load_options import settings_from
from vramchat.shared.load_plan import Machine
from vramchat.shared.planner import PlanError
from vramchat.shared.protocol import ProtocolError, field_of

if TYPE_CHECKING:
    from vramchat.daemon.hub_cache import RepoCache
    from vramchat.shared.hub import RepoListing

log = logging.getLogger(__name__)

STATE_FILE = "downloads.json"
PROGRESS_INTERVAL_S = 0.25
RATE_WINDOW_S = 3.0  # the rate is the bytes of the last few seconds, so a stall shows soon
KEEP_FINISHED = 20  # finished downloads `status` still shows, newest last
ACTIVE = ("queued", "downloading")


@dataclass
class PullFile:
    """One file of a pull, and how much of it is on disk (the downloading thread moves `done_bytes`)."""

    path: str
    size_bytes: int
    sha256: str
    done_bytes: int = 0


@dataclass
class Download:
    """One pull: what `download` events and `status` show, and what downloads.json keeps."""

    id: str
    repo: str
    quant: str
    revision: str  # the commit every file is fetched at
    ref: str | None  # the branch or tag asked for, named in refs/ as huggingface_hub does
    files: list[PullFile]  # in the listing's order: shard 1 of a set first
    state: str = "queued"  # queued, downloading, complete, error, cancelled; the view adds verifying
    error: str | None = None
    model_path: str | None = None
    created_at: float = field(default_factory=time.time)
    rate_bps: float | None = None
    verifying: bool = False  # set by the thread while it checks bytes on disk rather than fetching
    halt: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def done_bytes(self) -> int:
        return sum(f.done_bytes for f in self.files)

    def view(self) -> dict[str, Any]:
        done, rate = self.done_bytes, self.rate_bps if self.state == "downloading" else None
        return {
            "id": self.id,
            "repo": self.repo,
            "quant": self.quant,
            "revision": self.revision,
            "state": "verifying" if self.state == "downloading" and self.verifying else self.state,
            "files": [
                {"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256, "done_bytes": f.done_bytes} for f in self.files
            ],
            "total_bytes": self.total_bytes,
            "done_bytes": done,
            "rate_bps": rate,
            "eta_s": (self.total_bytes - done) / rate if rate else None,
            "error": self.error,
            "model_path": self.model_path,
        }

    def record(self) -> dict[str, Any]:
        keep = ("id", "repo", "quant", "revision", "ref", "state", "error", "model_path", "created_at")
        files = [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in self.files]
        return {**{name: getattr(self, name) for name in keep}, "files": files}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Download:
        """A download downloads.json kept; one that was running is queued again by `Downloads.run`."""
        files = [PullFile(f["path"], int(f["size_bytes"]), f["sha256"]) for f in record["files"]]
        download = cls(**{**record, "files": files})
        return download


class Downloads:
    """The queue of pulls, its worker (`run`, a supervised task) and the requests that feed it."""

    def __init__(self, *, bus: EventBus, config: Config, data_dir: Path, sampler: TelemetrySampler) -> None:
        self.bus, self.config, self.sampler = bus, config, sampler
        self.path = data_dir / STATE_FILE
        self.items = self._read()
        self._wake = asyncio.Event()
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="downloads-state")  # one writer: saves land in order

    def views(self) -> list[dict[str, Any]]:
        return [d.view() for d in self.items]

    def cache(self, download: Download) -> RepoCache:
        from vramchat.daemon.hub_cache import RepoCache

        return RepoCache(paths.hf_hub_cache(), download.repo)

    # --- requests ------------------------------------------------------------------------------

    async def pull(self, body: dict[str, Any]) -> dict[str, Any]:
        """Queue the files of a quantization (the recommended one when none is named)."""
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        from vramchat.shared import hub

        repo = field_of(body, "repo", str)
        quant = field_of(body, "quant", str, None)
        revision = field_of(body, "revision", str, None)
        try:
            validate_repo_id(repo)
        except HFValidationError:
            raise ProtocolError("invalid_value", f"{repo!r} is not a Hub repo: write it as OWNER/NAME") from None
        try:
            listing = await asyncio.to_thread(hub.list_quants, repo, revision)
            if quant is None:
                quant = await asyncio.to_thread(self._recommend, listing)
        except hub.HubError as exc:
            raise ProtocolError("hub", str(exc)) from None
        chosen = next((q for q in listing.quants if q.name.lower() == quant.lower()), None)
        if chosen is None:
            names = ", ".join(q.name for q in listing.quants)
            raise ProtocolError("not_found", f"{repo} has no quantization {quant!r}; it has {names}")
        if unverifiable := [f.path for f in chosen.files if not f.sha256]:
            raise ProtocolError(
                "hub", f"the Hub gives no sha256 for {', '.join(unverifiable)} (kept in git, not LFS), so it cannot be checked"
            )
        same = (repo, chosen.name, listing.revision)
        download = next((d for d in self._active() if (d.repo, d.quant, d.revision) == same), None)
        if download is None:  # else the same pull again: its progress, to follow
            files = [PullFile(f.path, f.size_bytes, f.sha256 or "") for f in chosen.files]
            ref = None if revision == listing.revision else revision or "main"
            download = Download(uuid.uuid4().hex[:8], repo, chosen.name, listing.revision, ref, files)
            ahead = sum(d.total_bytes - d.done_bytes for d in self._active())
            self.items.append(download)  # first, so that the same pull meanwhile finds it
            try:
                await asyncio.to_thread(self._check_room, download, ahead)
            except ProtocolError:
                self.items.remove(download)
                raise
            await self._changed(download)
            self._wake.set()
        return {"download": download.view(), "position": self._active().index(download)}

    async def cancel(self, body: dict[str, Any]) -> dict[str, Any]:
        """Stop a pull, queued or running, and remove its partial files."""
        wanted = field_of(body, "id", str)
        download = next((d for d in self.items if d.id == wanted), None)
        if download is None:
            raise ProtocolError("not_found", f"no download {wanted!r}; `vramchat pull` lists them")
        if download.state not in ACTIVE:
            raise ProtocolError("invalid_value", f"download {wanted} is {download.state} already; there is nothing to cancel")
        running = download.state == "downloading"
        download.state = "cancelled"
        download.halt.set()
        if not running:  # else the worker removes them once its thread has let go of them
            await asyncio.to_thread(self.cache(download).remove_partials, download.files)
        await self._changed(download)
        return {"download": download.view()}

    def _recommend(self, listing: RepoListing) -> str:
        """plan_repo's choice for this machine, as a load would find it (in a thread: it reads headers)."""
        from vramchat.shared import hub

        host = Machine.from_sample(self.sampler.latest() or self.sampler.sample(engine_pid=None))
        if self.config.ram_budget is not None:
            host = replace(host, available_ram=min(host.available_ram, self.config.ram_budget))
        try:
            settings = settings_from({}, self.config.load_defaults(), self.config.n_ctx)
        except PlanError as exc:
            raise ProtocolError("invalid_value", f"the config's load options: {exc}") from None
        planned = hub.plan_repo(listing, host, settings)
        if planned["recommended"] is None:
            raise ProtocolError(
                "invalid_value", f"no quantization of {listing.repo} to recommend: {planned['why']}; name one as REPO:QUANT"
            )
        return str(planned["recommended"])

    def _check_room(self, download: Download, ahead: int) -> None:
        """Count what is on disk already, and refuse a pull the disk has no room for, after the
        `ahead` bytes the pulls queued before it have left to fetch."""
        from vramchat.daemon.hub_cache import FetchError, check_room

        self._measure(download)
        left = ahead + download.total_bytes - download.done_bytes
        try:
            check_room(paths.hf_hub_cache(), left, f"{download.repo}:{download.quant}")
        except FetchError as exc:
            raise ProtocolError("no_space", str(exc) + (" (with the pulls queued before it)" if ahead else "")) from None

    def _measure(self, download: Download) -> None:
        """Count the bytes of each file already in the cache (in a thread: it reads the disk)."""
        cache = self.cache(download)
        for file in download.files:
            file.done_bytes = cache.on_disk(file)

    def _active(self) -> list[Download]:
        return [d for d in self.items if d.state in ACTIVE]

    # --- the worker ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Download what is queued, one pull at a time, in the order they came."""
        for left in self._active():  # what an earlier daemon, or run, left: show how far each got
            left.state = "queued"
            await asyncio.to_thread(self._measure, left)
        while True:
            download = next((d for d in self.items if d.state == "queued"), None)
            if download is None:
                self._wake.clear()
                await self._wake.wait()
            else:
                await self._download(download)

    async def _download(self, download: Download) -> None:
        from vramchat.daemon.hub_cache import FetchError, Halted

        download.state, download.error = "downloading", None
        await self._changed(download)
        work = asyncio.get_running_loop().run_in_executor(None, self._fetch, download)
        try:
            download.model_path = await self._follow(download, work)
            download.state = "complete"  # even if cancelled meanwhile: it is in the cache, whole
        except asyncio.CancelledError:  # the daemon is stopping: the thread lets go at its next chunk
            download.halt.set()
            raise
        except Halted:
            pass  # cancelled: the state says so already
        except Exception as exc:
            if not isinstance(exc, FetchError):
                log.exception("download %s of %s failed", download.id, download.repo)
                exc = FetchError(f"the daemon failed on this download ({exc}); see its log, then pull again")
            if download.state != "cancelled":
                download.state, download.error = "error", str(exc)
        if download.state == "cancelled":
            try:
                await asyncio.to_thread(self.cache(download).remove_partials, download.files)
            except OSError as exc:
                log.warning("cannot remove the partial files of cancelled download %s: %s", download.id, exc)
        download.verifying = False
        await self._changed(download)

    def _fetch(self, download: Download) -> str:
        """In a thread: every file into the cache, verified, then the snapshot; the model's path."""
        from vramchat.daemon.hub_cache import FileFetch, check_room

        cache = self.cache(download)
        self._measure(download)
        check_room(cache.cache_dir, download.total_bytes - download.done_bytes, f"{download.repo}:{download.quant}")

        def verifying(on: bool) -> None:
            download.verifying = on

        for file in download.files:
            FileFetch(cache, download.repo, download.revision, file, download.halt, verifying).run()
        cache.link(download.revision, download.ref, download.files)  # only now: a partial set is never a model
        return str(cache.snapshot(download.revision, download.files[0].path))

    async def _follow(self, download: Download, work: asyncio.Future[str]) -> str:
        """Publish the view while the thread works: on a change, at most every PROGRESS_INTERVAL_S."""
        loop = asyncio.get_running_loop()
        samples: deque[tuple[float, int]] = deque()
        shown = download.view()
        while True:
            finished, _ = await asyncio.wait({work}, timeout=PROGRESS_INTERVAL_S)
            if finished:
                return work.result()
            now, done = loop.time(), download.done_bytes
            if samples and done < samples[-1][1]:  # a file started over (refused, or the server ignored a Range)
                samples.clear()
            samples.append((now, done))
            while now - samples[0][0] > RATE_WINDOW_S:
                samples.popleft()
            first_time, first_done = samples[0]
            download.rate_bps = (done - first_done) / (now - first_time) if now > first_time else None
            view = download.view()
            if (view["state"], view["done_bytes"]) != (shown["state"], shown["done_bytes"]):
                self.bus.publish("download", view)
                shown = view

    # --- persistence and events ----------------------------------------------------------------

    async def _changed(self, download: Download) -> None:
        """A change of state: publish it, and keep the queue on disk."""
        if download.state not in ACTIVE:
            download.rate_bps = None
        self.bus.publish("download", download.view())
        finished = [d for d in self.items if d.state not in ACTIVE]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            self.items.remove(old)
        records = [d.record() for d in self.items]
        try:
            await asyncio.get_running_loop().run_in_executor(self._disk, _write_atomically, self.path, records)
        except OSError as exc:
            log.warning("cannot keep the download queue in %s (%s): a restart will not resume it", self.path, exc)

    def _read(self) -> list[Download]:
        try:
            records = json.loads(self.path.read_text())
            return [Download.from_record(record) for record in records]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring the download queue in %s (%s): pull again what was queued", self.path, exc)
            return []


def _write_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace the file whole, so a daemon killed meanwhile leaves the old queue or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(records, indent=1))
    os.replace(temporary, path)
