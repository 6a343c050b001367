"""Replies: the one first-in, first-out queue and its limits, and the worker that drives the engine."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramchat.daemon import model_files
from vramchat.daemon.events import EventBus
from vramchat.daemon.jobs import Job, JobResult, Turn
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.daemon.store import AT_HEAD, AtHead, NotFound, Store, StoreError
from vramchat.daemon.supervisor import EngineProcess, describe_exit
from vramchat.shared.protocol import CONTEXT_OVERFLOW_POLICIES, SAMPLING_FIELDS, ProtocolError, field_of
from vramchat.shared.thinking import ThinkingClock

log = logging.getLogger(__name__)

# Flush a growing reply to SQLite at most this often; the final text is always written at once.
REPLY_FLUSH_INTERVAL_S = 0.5
MAX_QUEUED_PER_CLIENT = 32
MAX_QUEUED_TOTAL = 256
# What each sampling field may be: llama.cpp takes them as C ints, uint32 (the seed) and floats,
# where a value outside would overflow in the engine or mean nothing. repeat_penalty divides: not 0.
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 5),
    "top_p": (0, 1),
    "top_k": (0, 1 << 20),
    "min_p": (0, 1),
    "repeat_penalty": (0, 10),
    "max_tokens": (1, (1 << 31) - 1),
    "seed": (0, (1 << 32) - 1),
}


@dataclass
class InFlight:
    """The reply being generated, as far as it has come."""

    job: Job
    message_id: str | None  # None: not stored
    text: str = ""
    tokens: int = 0  # with text, so far: the `index` of the next `tok` event
    first_token_at: float | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None


class GenerationQueue:
    """Runs queued requests one at a time, in arrival order, and stores each reply as it grows."""

    def __init__(self, store: Store, bus: EventBus, model: ModelLifecycle, *, context_overflow: str = "drop_oldest") -> None:
        """`context_overflow` is the policy of conversations whose settings name none."""
        self.store, self.bus, self.model = store, bus, model
        self.context_overflow = context_overflow
        self.pending: collections.deque[Job] = collections.deque()
        self.in_flight: InFlight | None = None
        self.taken: Job | None = None  # the latest job the worker took off the queue
        self.last_stats: dict[str, Any] | None = None  # of the latest finished reply
        # Told how every queued job ended, wherever it ends (set by the daemon: its metrics).
        self.on_finished: Callable[[JobResult], None] | None = None
        self._changed = asyncio.Event()

    # --- the queue ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The `queue` event's body."""
        running = self.in_flight.job if self.in_flight else None
        return {
            "running": running.view(0) if running else None,
            "pending": [job.view(position) for position, job in enumerate(self.pending, start=1)],
        }

    def publish(self) -> None:
        self.bus.publish("queue", self.state())

    def add_user_message(self, conversation_id: str, content: str, parent: str | AtHead | None = AT_HEAD) -> dict[str, Any]:
        """Store a question before it is queued: a daemon killed meanwhile loses nothing. After
        `parent` (an edit: the edited question's parent), by default at the end of the branch."""
        message = self.store.add_message(conversation_id, "user", content, parent=parent)
        self.bus.publish("msg", message)
        return message

    def has_work_for(self, conversation_id: str) -> bool:
        """Whether a reply for this conversation is queued or generating."""
        return (self.in_flight is not None and self.in_flight.job.conversation_id == conversation_id) or any(
            job.conversation_id == conversation_id for job in self.pending
        )

    def check_room(self, client: bytes) -> None:
        """Refuse a request the limits leave no room for, before anything is stored for it."""
        if not self.model.state.available:
            raise ProtocolError("no_model", self._no_model())
        if len(self.pending) >= MAX_QUEUED_TOTAL:
            raise ProtocolError("queue_full", f"{len(self.pending)} requests are queued, the most the daemon holds; retry later")
        mine = sum(1 for job in self.pending if job.client == client)
        if mine >= MAX_QUEUED_PER_CLIENT:
            raise ProtocolError(
                "queue_full", f"you have {mine} requests queued, the most one client may; wait for some to finish"
            )

    def _no_model(self) -> str:
        reason = f" ({self.model.state.error})" if self.model.state.error else ""
        return f"no model is loaded{reason}: load one with `vramchat load MODEL`"

    def enqueue(self, job: Job) -> int:
        """Queue `job`; returns its position (1 = next)."""
        if any(queued.request_id == job.request_id for queued in self.pending) or (
            self.in_flight and self.in_flight.job.request_id == job.request_id
        ):
            raise ProtocolError("bad_request", f"request id {job.request_id!r} is already queued; use a fresh id per request")
        job.on_finished = self.on_finished
        self.pending.append(job)
        self._changed.set()
        self.publish()
        return len(self.pending) + (1 if self.in_flight else 0)

    def cancel(self, request_id: str, reason: str = "cancelled by a client") -> str:
        """Cancel a queued or running request; returns which it was."""
        if self.in_flight and self.in_flight.job.request_id == request_id:
            self.cancel_running(reason)
            return "running"
        for job in self.pending:
            if job.request_id == request_id:
                self.pending.remove(job)
                job.finish(JobResult("cancelled", error=reason))
                self.publish()
                return "queued"
        raise ProtocolError("not_found", f"request {request_id!r} is neither queued nor running (it may have finished)")

    def cancel_running(self, reason: str) -> None:
        """Ask the engine to stop the reply in flight at its next token."""
        engine = self.model.engine
        if self.in_flight and not self.in_flight.cancel_requested and engine:
            self.in_flight.cancel_requested = True
            self.in_flight.cancel_reason = reason
            engine.send({"op": "cancel", "request": self.in_flight.job.request_id})

    def speed(self) -> dict[str, Any]:
        """Speed now (the reply in flight) and of the latest finished reply, for telemetry."""
        view: dict[str, Any] = {"generating": self.in_flight is not None, "tokens_per_s": None}
        flight = self.in_flight
        if flight and flight.first_token_at and flight.tokens > 1:
            elapsed = time.monotonic() - flight.first_token_at
            view["tokens_per_s"] = (flight.tokens - 1) / elapsed if elapsed > 0 else None
        if self.last_stats:
            view["last"] = {
                k: self.last_stats.get(k) for k in ("tokens_per_s", "prompt_tokens_per_s", "ttft_s", "generated_tokens")
            }
        return view

    # --- the worker --------------------------------------------------------------------------

    async def worker(self) -> None:
        """Runs jobs for as long as the daemon runs; the daemon starts it again if it ever dies."""
        if self.taken is not None and not self.taken.done:  # a worker that died left this one: end it
            self._end_alone(self.taken, RuntimeError("the generation worker stopped during this request"))
        while True:
            if not self.pending:
                self._changed.clear()
                await self._changed.wait()
                continue
            if self.model.state.state == "unloaded":
                await self.model.wake()  # unloaded while idle (keep_alive): back with the same settings
                continue
            if not self.model.state.available:
                await self._alone(self._take(), None)
                continue
            await self.model.ready.wait()
            async with self.model.engine_lock:
                engine = self.model.engine
                if not self.model.ready.is_set() or not self.pending or engine is None:
                    continue
                self.model.last_used = time.monotonic()
                await self._alone(self._take(), engine)
                self.model.last_used = time.monotonic()

    def _take(self) -> Job:
        """The next job, remembered until it ends: a worker started again ends one left unfinished."""
        self.taken = self.pending.popleft()
        return self.taken

    async def _alone(self, job: Job, engine: EngineProcess | None) -> None:
        """Run `job` on `engine`, or refuse it for want of a model; whatever raises ends this job
        alone, with an error its client sees, and the queue goes on."""
        try:
            if engine is None:
                self._end(job, JobResult("error", error=self._no_model(), code="no_model"))
            else:
                await self._run(job, engine)
        except Exception as exc:
            log.exception("request %s failed in the daemon", job.request_id)
            self._end_alone(job, exc)

    def _end_alone(self, job: Job, exc: Exception) -> None:
        """End a job that failed in the daemon, keep what it had, and stop the engine's side of it."""
        flight = self.in_flight if self.in_flight and self.in_flight.job is job else None
        self.in_flight = None
        if flight and (engine := self.model.engine):
            engine.send({"op": "cancel", "request": job.request_id})  # it ignores a request it never started
        if isinstance(exc, StoreError):
            error, code = f"the conversation store failed during this reply ({exc})", "storage"
        else:
            error, code = f"the daemon failed on this reply ({type(exc).__name__}: {exc}); see its log", "internal"
        try:
            self._end(job, JobResult("error", flight.text if flight else "", error=error, code=code), flight)
        except Exception:  # the store itself, most likely: the client still gets its answer
            log.exception("could not store the end of request %s", job.request_id)
            if not job.done:
                job.finish(JobResult("error", error=error, code=code))
            self.publish()

    def _end(self, job: Job, result: JobResult, flight: InFlight | None = None) -> None:
        """A job that ended in error before or while running: its reply is stored as failed (with
        the text it had), so every client sees how it ended."""
        if job.conversation_id is not None:
            message_id = flight.message_id if flight and flight.message_id else None
            if message_id is None:
                message_id = self.store.add_message(job.conversation_id, "assistant", "", status="error")["id"]
            self.store.update_message(message_id, content=result.text, status="error", error=result.error)
            self.bus.publish("msg", {**self.store.get_message(message_id), "request": job.request_id})
        job.finish(result)
        self.publish()

    def _turn(self, job: Job) -> Turn | None:
        """What to send the engine for `job`; None when its conversation is gone.

        The model's defaults (the demo model's system prompt and sampling) come first, then the
        conversation's settings, then the request's own. A reply that is not stored gets the old
        hard error on overflow, as OpenAI's API does: its client decides what to leave out."""
        defaults = model_files.defaults_for(Path(self.model.state.path or ""))
        if job.conversation_id is None:
            messages = job.messages or []
            system = defaults.get("system_prompt") if messages and messages[0]["role"] != "system" else None
            opening = [{"role": "system", "content": system}] if system else []
            return Turn(opening + messages, {**defaults.get("sampling", {}), **job.sampling}, {"policy": "error"})
        try:
            conversation = self.store.get_conversation(job.conversation_id)
        except NotFound:
            return None
        settings = dict(conversation["settings"])
        policy = settings.pop("context_overflow", None) or self.context_overflow
        system_prompt = conversation["system_prompt"] or defaults.get("system_prompt")
        stored = self.store.messages(job.conversation_id)  # the current branch: earlier versions are not sent
        sent = [m for m in stored if m["content"]]
        passed = [m["id"] for m in sent]
        # Where the previous reply's view started: this prompt starts there too, or later.
        view = next((m["stats"]["context"] for m in reversed(stored) if (m.get("stats") or {}).get("context")), None)
        dropped = passed.index(view["first_message"]) if view and view["first_message"] in passed else 0
        return Turn(
            messages=([{"role": "system", "content": system_prompt}] if system_prompt else [])
            + [{"role": m["role"], "content": m["content"]} for m in sent],
            sampling={**defaults.get("sampling", {}), **settings, **job.sampling},
            overflow={"policy": policy, "dropped": dropped},
            passed=passed,
            stored=[m["id"] for m in stored],
        )

    async def _run(self, job: Job, engine: EngineProcess) -> None:
        turn = self._turn(job)
        if turn is None:
            job.finish(JobResult("error", error="the conversation was deleted before its turn came", code="not_found"))
            self.publish()
            return
        message = None
        if job.conversation_id is not None:  # after the head, which no version change moves while this job is queued
            message = self.store.add_message(
                job.conversation_id, "assistant", "", status="generating", model=self.model.state.name
            )
            self.bus.publish("msg", {**message, "request": job.request_id})
        self.in_flight = flight = InFlight(job, message["id"] if message else None)
        self.publish()
        engine.send(
            {
                "op": "generate",
                "request": job.request_id,
                "conversation": job.conversation_id or state_key(turn.messages),
                "messages": turn.messages,
                "sampling": turn.sampling,
                "overflow": turn.overflow,
                "stop": job.stop,
                **job.engine,
            }
        )

        status, error, stats, code, finish_reason = "complete", None, None, None, None
        last_flush = time.monotonic()
        reasoning = ThinkingClock()  # the tokens and seconds of the reply's <think> block
        while True:
            event = await engine.events.get()
            kind = event.get("ev")
            if kind == "tok" and event["request"] == job.request_id:
                # One frame of one or more tokens (the engine's TokenFrames), passed on as one event.
                text, stamps = event["text"], event["t"]
                flight.text += text
                flight.tokens += len(stamps)
                flight.first_token_at = flight.first_token_at or time.monotonic()
                reasoning.add(text, stamps)
                job.emit(text)
                if message is None:
                    continue
                self.bus.publish(
                    "tok",
                    {
                        "request": job.request_id,
                        "conversation": job.conversation_id,
                        "message": message["id"],
                        "index": flight.tokens - len(stamps),
                        "count": len(stamps),
                        "text": text,
                        "t_engine": stamps[0],
                        "t_tokens": stamps,
                    },
                )
                if time.monotonic() - last_flush > REPLY_FLUSH_INTERVAL_S:
                    self.store.update_message(message["id"], content=flight.text)
                    last_flush = time.monotonic()
            elif kind == "done" and event["request"] == job.request_id:
                finish_reason = event["finish_reason"]
                stats = {**event["stats"], "finish_reason": finish_reason}
                stats["context"] = turn.context(stats.pop("dropped_messages", 0))
                if reasoning.stats is not None:
                    stats["thinking"] = reasoning.stats
                self.last_stats = stats
                self.model.state_cache_changed(stats["state_cache_bytes"])
                if event["finish_reason"] == "cancelled":
                    status, error = "cancelled", flight.cancel_reason
                break
            elif kind == "failed" and event["request"] == job.request_id:
                status, error, code = "error", event["error"], event.get("code")
                break
            elif kind == "exited":
                status, error = "interrupted", f"the engine {describe_exit(event['returncode'])} during this reply"
                break
        self.in_flight = None
        if message is not None:
            self.store.update_message(message["id"], content=flight.text, status=status, stats=stats, error=error)
            self.bus.publish("msg", {**self.store.get_message(message["id"]), "request": job.request_id})
        job.finish(JobResult(status, flight.text, finish_reason, stats, error, code))
        self.publish()


def state_key(messages: list[dict[str, Any]]) -> str:
    """The engine's KV state cache key for a reply that is not stored: its messages up to the first
    user message, so a chat client that resends a growing history finds its state again."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    opening = json.dumps(messages[: first_user + 1], sort_keys=True).encode()
    return "unstored-" + hashlib.sha256(opening).hexdigest()[:16]


def checked_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A conversation's settings: its sampling, and what happens when it outgrows the context."""
    settings = checked_sampling(raw)
    overflow = field_of(raw, "context_overflow", str, None)
    if overflow is not None:
        if overflow not in CONTEXT_OVERFLOW_POLICIES:
            raise ProtocolError("invalid_value", f"context_overflow must be one of {', '.join(CONTEXT_OVERFLOW_POLICIES)}")
        settings["context_overflow"] = overflow
    return settings


def checked_sampling(raw: dict[str, Any]) -> dict[str, Any]:
    """Keep the known sampling fields, with their types and ranges checked (NaN is in no range)."""
    sampling = {}
    for name, kind in SAMPLING_FIELDS.items():
        if name in raw and raw[name] is not None:
            sampling[name] = value = field_of(raw, name, (int, float) if kind is float else int)
            low, high = SAMPLING_RANGES[name]
            if name == "repeat_penalty" and value == 0:
                raise ProtocolError("invalid_value", f"repeat_penalty must be above 0 (1 turns it off), at most {high}")
            if not low <= value <= high:
                raise ProtocolError("invalid_value", f"{name} must be between {low} and {high}, not {value}")
    return sampling
