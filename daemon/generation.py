"""Replies: the jobs, the one first-in, first-out queue and its limits, and the worker that drives the engine."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramchat.daemon import model_files
from vramchat.daemon.events import EventBus
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.daemon.store import NotFound, Store
from vramchat.daemon.supervisor import EngineProcess, describe_exit
from vramchat.shared.protocol import ProtocolError

# Flush a growing reply to SQLite at most this often; the final text is always written at once.
REPLY_FLUSH_INTERVAL_S = 0.5
MAX_QUEUED_PER_CLIENT = 32
MAX_QUEUED_TOTAL = 256


@dataclass
class Job:
    request_id: str
    conversation_id: str
    client: bytes
    sampling: dict[str, Any]
    enqueued_at: float = field(default_factory=time.time)

    def view(self, position: int) -> dict[str, Any]:
        return {
            "request": self.request_id,
            "conversation": self.conversation_id,
            "position": position,
            "enqueued_at": self.enqueued_at,
        }


@dataclass
class InFlight:
    """The reply being generated, as far as it has come."""

    job: Job
    message_id: str
    text: str = ""
    tokens: int = 0
    first_token_at: float | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None


class GenerationQueue:
    """Runs queued requests one at a time, in arrival order, and stores each reply as it grows."""

    def __init__(self, store: Store, bus: EventBus, model: ModelLifecycle) -> None:
        self.store, self.bus, self.model = store, bus, model
        self.pending: collections.deque[Job] = collections.deque()
        self.in_flight: InFlight | None = None
        self.last_stats: dict[str, Any] | None = None  # of the latest finished reply
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

    def has_work_for(self, conversation_id: str) -> bool:
        """Whether a reply for this conversation is queued or generating."""
        return (self.in_flight is not None and self.in_flight.job.conversation_id == conversation_id) or any(
            job.conversation_id == conversation_id for job in self.pending
        )

    def check_room(self, client: bytes) -> None:
        """Refuse a request the limits leave no room for, before anything is stored for it."""
        if not self.model.state.available:
            reason = f" ({self.model.state.error})" if self.model.state.error else ""
            raise ProtocolError("no_model", f"no model is loaded{reason}: load one with `vramchat load MODEL`")
        if len(self.pending) >= MAX_QUEUED_TOTAL:
            raise ProtocolError("queue_full", f"{len(self.pending)} requests are queued, the most the daemon holds; retry later")
        mine = sum(1 for job in self.pending if job.client == client)
        if mine >= MAX_QUEUED_PER_CLIENT:
            raise ProtocolError(
                "queue_full", f"you have {mine} requests queued, the most one client may; wait for some to finish"
            )

    def enqueue(self, job: Job) -> int:
        """Queue `job`; returns its position (1 = next)."""
        if any(queued.request_id == job.request_id for queued in self.pending) or (
            self.in_flight and self.in_flight.job.request_id == job.request_id
        ):
            raise ProtocolError("bad_request", f"request id {job.request_id!r} is already queued; use a fresh id per request")
        self.pending.append(job)
        self._changed.set()
        self.publish()
        return len(self.pending) + (1 if self.in_flight else 0)

    def cancel(self, request_id: str) -> str:
        """Cancel a queued or running request; returns which it was."""
        if self.in_flight and self.in_flight.job.request_id == request_id:
            self.cancel_running("cancelled by a client")
            return "running"
        for job in self.pending:
            if job.request_id == request_id:
                self.pending.remove(job)
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
        while True:
            if not self.pending:
                self._changed.clear()
                await self._changed.wait()
                continue
            if not self.model.state.available:
                self._fail(self.pending.popleft(), "no model is loaded: load one with `vramchat load MODEL`")
                continue
            await self.model.ready.wait()
            async with self.model.engine_lock:
                engine = self.model.engine
                if not self.model.ready.is_set() or not self.pending or engine is None:
                    continue
                await self._run(self.pending.popleft(), engine)

    def _fail(self, job: Job, error: str) -> None:
        message = self.store.add_message(job.conversation_id, "assistant", "", status="error")
        self.store.update_message(message["id"], error=error)
        self.bus.publish("msg", {**self.store.get_message(message["id"]), "request": job.request_id})
        self.publish()

    def _prompt(self, job: Job) -> tuple[list[dict[str, str]], dict[str, Any]] | None:
        """The messages to send and the sampling to use; None when the conversation is gone."""
        try:
            conversation = self.store.get_conversation(job.conversation_id)
        except NotFound:
            return None
        defaults = model_files.defaults_for(Path(self.model.state.path or ""))
        system_prompt = conversation["system_prompt"] or defaults.get("system_prompt")
        prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
        prompt += [{"role": m["role"], "content": m["content"]} for m in self.store.messages(job.conversation_id) if m["content"]]
        return prompt, {**defaults.get("sampling", {}), **conversation["settings"], **job.sampling}

    async def _run(self, job: Job, engine: EngineProcess) -> None:
        prompt = self._prompt(job)
        if prompt is None:
            self.publish()
            return
        messages, sampling = prompt
        message = self.store.add_message(job.conversation_id, "assistant", "", status="generating", model=self.model.state.name)
        self.in_flight = flight = InFlight(job, message["id"])
        self.bus.publish("msg", {**message, "request": job.request_id})
        self.publish()
        engine.send(
            {
                "op": "generate",
                "request": job.request_id,
                "conversation": job.conversation_id,
                "messages": messages,
                "sampling": sampling,
            }
        )

        status, error, stats = "complete", None, None
        last_flush = time.monotonic()
        index = 0
        while True:
            event = await engine.events.get()
            kind = event.get("ev")
            if kind == "tok" and event["request"] == job.request_id:
                flight.text += event["text"]
                flight.tokens += 1
                flight.first_token_at = flight.first_token_at or time.monotonic()
                self.bus.publish(
                    "tok",
                    {
                        "request": job.request_id,
                        "conversation": job.conversation_id,
                        "message": message["id"],
                        "index": index,
                        "text": event["text"],
                        "t_engine": event.get("t"),
                    },
                )
                index += 1
                if time.monotonic() - last_flush > REPLY_FLUSH_INTERVAL_S:
                    self.store.update_message(message["id"], content=flight.text)
                    last_flush = time.monotonic()
            elif kind == "done" and event["request"] == job.request_id:
                stats = self.last_stats = {**event["stats"], "finish_reason": event["finish_reason"]}
                if stats["state_cache_bytes"] != self.model.state.state_cache_bytes:
                    self.model.update(state_cache_bytes=stats["state_cache_bytes"])
                if event["finish_reason"] == "cancelled":
                    status, error = "cancelled", flight.cancel_reason
                break
            elif kind == "failed" and event["request"] == job.request_id:
                status, error = "error", event["error"]
                break
            elif kind == "exited":
                status, error = "interrupted", f"the engine {describe_exit(event['returncode'])} during this reply"
                break
        self.in_flight = None
        self.store.update_message(message["id"], content=flight.text, status=status, stats=stats, error=error)
        self.bus.publish("msg", {**self.store.get_message(message["id"]), "request": job.request_id})
        self.publish()
