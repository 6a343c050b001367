"""vramchatd's asyncio loop: the ROUTER for requests, the XPUB for events, the generation queue.

The daemon owns the conversations and the engine's lifecycle, and it stays up whatever a client
or the engine does: every handler error becomes an error reply, and an engine crash becomes a
`model` event, an `interrupted` reply and an automatic reload.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from vramchat.daemon import curve, models
from vramchat.daemon.notify import Notifier
from vramchat.daemon.store import NotFound, Store, StoreError
from vramchat.daemon.supervisor import EngineProcess, LoadFailed, describe_exit, launch
from vramchat.daemon.telemetry import AlarmTracker, TelemetrySampler
from vramchat.shared import protocol
from vramchat.shared.config import Config
from vramchat.shared.gguf import GGUFError
from vramchat.shared.llama_log import parse_load_log
from vramchat.shared.planner import (
    DEFAULT_VRAM_MARGIN,
    Machine,
    PlanSettings,
    estimate_tokens_per_second,
    fit,
    gpu_bandwidth_for,
    inspect_cached,
    predict,
    ram_bandwidth,
    swap_check,
)
from vramchat.shared.units import parse_size
from vramchat.shared.paths import ensure_private_dir
from vramchat.shared.protocol import SAMPLING_FIELDS, Event, ProtocolError, Request, field_of

log = logging.getLogger(__name__)

VERSION = "0.1.0"
# Flush a growing reply to SQLite at most this often; the final text is always written at once.
REPLY_FLUSH_INTERVAL_S = 0.5
MAX_QUEUED_PER_CLIENT = 32
MAX_QUEUED_TOTAL = 256
# After this many engine crashes within CRASH_WINDOW_S, stop reloading by itself.
MAX_AUTO_RELOADS = 3
CRASH_WINDOW_S = 300.0


# Each client may send this many requests in a burst, refilled at RATE_PER_S.
RATE_BURST = 200
RATE_PER_S = 100.0


@dataclass
class DaemonSettings:
    runtime_dir: Path
    data_dir: Path
    config: Config
    startup_model: str | None = None
    load_on_start: bool = True
    socket_dir_mode: int = 0o700
    # "HOST:PORT": control on PORT, events on PORT+1. CURVE unless insecure_tcp.
    tcp_listen: str | None = None
    insecure_tcp: bool = False
    telemetry_interval_s: float = 0.5
    # With no subscriber and no reply or load under way, samples only feed alarms, the status
    # line and the history a client gets when it attaches: an idle service, which runs all day,
    # takes them this often instead (docs/benchmarks.md, daemon footprint).
    unwatched_telemetry_interval_s: float = 5.0


@dataclass
class Listener:
    """A ROUTER for requests and an XPUB for events: one pair on ipc, one on TCP if configured."""

    name: str
    control: zmq.asyncio.Socket
    events: zmq.asyncio.Socket


class RateLimiter:
    """A token bucket per client, so one client cannot starve the others."""

    def __init__(self, burst: int = RATE_BURST, per_second: float = RATE_PER_S) -> None:
        self.burst, self.per_second = burst, per_second
        self.buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, client: bytes) -> bool:
        now = time.monotonic()
        tokens, since = self.buckets.get(client, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - since) * self.per_second)
        if len(self.buckets) > 10_000:  # forget idle clients rather than grow without bound
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
        allowed = tokens >= 1
        self.buckets[client] = (tokens - 1 if allowed else tokens, now)
        return allowed


@dataclass
class Job:
    request_id: str
    conversation_id: str
    client: bytes
    sampling: dict[str, Any]
    enqueued_at: float = field(default_factory=time.time)


@dataclass
class InFlight:
    job: Job
    message_id: str
    text: str = ""
    tokens: int = 0
    first_token_at: float | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None


class Daemon:
    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.config = settings.config
        self.epoch = uuid.uuid4().hex[:16]
        self.seq = 0
        self.started_at = time.time()
        self.context = zmq.asyncio.Context()
        self.store: Store | None = None
        self.engine: EngineProcess | None = None
        self.model: dict[str, Any] = {"state": "idle"}
        self.last_load_params: dict[str, Any] | None = None
        self.pending: collections.deque[Job] = collections.deque()
        self.in_flight: InFlight | None = None
        self.subscribers = 0
        self.listeners: list[Listener] = []
        self.rate_limiter = RateLimiter()
        self._authenticator: Any = None
        self.telemetry = TelemetrySampler(interval_s=settings.telemetry_interval_s)
        self.alarms = AlarmTracker()
        self.last_stats: dict[str, Any] | None = None
        self._queue_changed = asyncio.Event()
        self._new_subscriber = asyncio.Event()
        self._model_ready = asyncio.Event()
        self._engine_lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._crash_times: list[float] = []
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.notifier = Notifier.from_env()  # also keeps NOTIFY_SOCKET away from the engine
        self.handlers: dict[str, Callable[[Request, bytes], Awaitable[dict[str, Any]]]] = {
            "hello": self.on_hello,
            "snapshot": self.on_snapshot,
            "status": self.on_status,
            "models": self.on_models,
            "load": self.on_load,
            "chat": self.on_chat,
            "regenerate": self.on_regenerate,
            "cancel": self.on_cancel,
            "conversation.create": self.on_conversation_create,
            "conversation.list": self.on_conversation_list,
            "conversation.get": self.on_conversation_get,
            "conversation.update": self.on_conversation_update,
            "conversation.delete": self.on_conversation_delete,
        }
        assert set(self.handlers) == set(protocol.REQUEST_TYPES), "protocol.REQUEST_TYPES and the handlers disagree"

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        runtime_dir = ensure_private_dir(self.settings.runtime_dir, self.settings.socket_dir_mode)
        self._lock_file = _take_instance_lock(runtime_dir)
        self.store = Store(self.settings.data_dir / "conversations.sqlite3")
        interrupted = self.store.mark_interrupted()
        if interrupted:
            log.warning("marked %d reply(ies) interrupted by the previous daemon's end", interrupted)

        old_umask = os.umask(0o077 if self.settings.socket_dir_mode == 0o700 else 0o007)
        try:
            self.listeners.append(self._listener("ipc", *(f"ipc://{_checked_ipc_path(runtime_dir / name)}"
                                                           for name in (protocol.CONTROL_SOCKET, protocol.EVENTS_SOCKET))))
        finally:
            os.umask(old_umask)
        if self.settings.tcp_listen:
            self.listeners.append(self._tcp_listener(self.settings.tcp_listen))
        log.info("vramchatd %s listening in %s (epoch %s)", VERSION, runtime_dir, self.epoch)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        for index, listener in enumerate(self.listeners):
            # ROUTER identities are only unique per socket: prefix them with the socket's number
            # to name a client for queue and rate limits.
            self._spawn(self._serve_control(listener.control, b"%d:" % index))
            self._spawn(self._watch_subscriptions(listener.events))
        self._spawn(self._generation_worker())
        self._spawn(self._sample_telemetry())
        startup = self._startup_model() if self.settings.load_on_start else None
        if startup:
            self.model = {"state": "loading", "progress": 0.0}  # requests arriving now wait for it
            self._spawn(self._load_quietly(startup))
        # READY before the load: a big model can take longer than systemd's start timeout.
        self.notifier.ready(f"listening in {runtime_dir}" + (f"; loading {startup['model']}" if startup else ""))
        self._spawn(self.notifier.watchdog_loop())

        await self._stopping.wait()
        await self._shutdown()
        return 0

    def _listener(self, name: str, control_endpoint: str, events_endpoint: str, curve_keys: tuple[bytes, bytes] | None = None) -> Listener:
        sockets = []
        for kind, endpoint in ((zmq.ROUTER, control_endpoint), (zmq.XPUB, events_endpoint)):
            socket = self.context.socket(kind)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, protocol.ZMQ_MAX_MESSAGE_BYTES)
            if kind == zmq.XPUB:
                socket.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, for the client count
                socket.setsockopt(zmq.SNDHWM, 100_000)
            if curve_keys:
                curve.make_curve_server(socket, *curve_keys)
            socket.bind(endpoint)
            sockets.append(socket)
        return Listener(name, *sockets)

    def _tcp_listener(self, address: str) -> Listener:
        host, _, port_text = address.rpartition(":")
        if not host or not port_text.isdigit():
            raise SystemExit(f'--tcp wants HOST:PORT, e.g. 127.0.0.1:5555, not {address!r}')
        port = int(port_text)
        endpoints = (f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}")
        if self.settings.insecure_tcp:
            log.warning("SERVING PLAIN TCP ON %s:%d-%d: NO ENCRYPTION, NO AUTHENTICATION; anyone who can "
                        "reach the port can read every conversation and load any model", host, port, port + 1)
            return self._listener("tcp", *endpoints)
        keys_dir = curve.keys_dir(self.settings.data_dir)
        try:
            keys = curve.load_server_secret(keys_dir, endpoints[0])
        except curve.CurveKeyError as exc:
            raise SystemExit(str(exc)) from None
        self._authenticator = curve.start_authenticator(self.context, curve.authorized_dir(keys_dir))
        log.info("serving CURVE TCP on %s:%d-%d for the keys in %s", host, port, port + 1, curve.authorized_dir(keys_dir))
        return self._listener("tcp", *endpoints, curve_keys=keys)

    def _startup_model(self) -> dict[str, Any] | None:
        name = self.settings.startup_model or self.config.default_model
        if name is None:
            demo = next((m for m in models.discover(self.config.model_dirs) if m["source"] == "demo"), None)
            name = demo["path"] if demo else None
        if name is None:
            log.info("no model to load at start: configure default_model, or install the demo model")
            return None
        return {"model": name}

    async def _load_quietly(self, body: dict[str, Any]) -> None:
        try:
            await self.load(body, trusted=True)
        except ProtocolError as exc:
            log.error("could not load the start-up model: %s", exc.message)
            if self.model.get("state") == "loading":
                self._set_model(state="error", error=exc.message, progress=None)

    async def _shutdown(self) -> None:
        """SIGTERM: let the running reply stop at the next token, store it, then exit."""
        log.info("stopping")
        self.notifier.stopping()
        if self.in_flight:
            self._cancel_running("the daemon was stopped")
            try:
                await asyncio.wait_for(self._engine_lock.acquire(), 10)
            except asyncio.TimeoutError:
                log.warning("the running reply did not stop in 10 s; it will be marked interrupted")
        if self.engine:
            await self.engine.stop()
        for task in self._tasks:
            task.cancel()
        for listener in self.listeners:
            listener.control.close()
            listener.events.close()
        if self._authenticator:
            self._authenticator.stop()
        self.context.term()
        if self.store:
            self.store.close()  # a reply still `generating` is marked interrupted at the next start
        for name in (protocol.CONTROL_SOCKET, protocol.EVENTS_SOCKET):
            (self.settings.runtime_dir / name).unlink(missing_ok=True)
        self.notifier.close()

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # --- events --------------------------------------------------------------------------------

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.seq += 1
        event = Event(topic=topic, epoch=self.epoch, seq=self.seq, body=body)
        frames = event.frames()
        for listener in self.listeners:
            try:
                listener.events.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # a subscriber over its high-water mark; it will see the gap
                log.debug("event %d not sent on %s: %s", self.seq, listener.name, exc)

    async def _watch_subscriptions(self, events: zmq.asyncio.Socket) -> None:
        """XPUB hands us each (un)subscription. Publishing on every change also tells a new
        subscriber that its subscription is active (it sees an event), which the Clone pattern's
        snapshot-after-subscribe needs."""
        while True:
            frame = await events.recv()
            if frame[:1] == b"\x01":
                self.subscribers += 1
                self._new_subscriber.set()
            elif frame[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)
            else:
                continue
            self.publish("clients", {"count": self.subscribers})

    def _queue_state(self) -> dict[str, Any]:
        running = self.in_flight.job if self.in_flight else None
        return {
            "running": _job_view(running, 0) if running else None,
            "pending": [_job_view(job, position) for position, job in enumerate(self.pending, start=1)],
        }

    def _publish_queue(self) -> None:
        self.publish("queue", self._queue_state())

    def _set_model(self, **changes: Any) -> None:
        previous = self.model.get("state")
        self.model = {**self.model, **changes}
        self.publish("model", self.model)
        if self.model.get("state") != previous:
            self.notifier.status(_model_status_line(self.model))

    # --- telemetry -----------------------------------------------------------------------------

    async def _sample_telemetry(self) -> None:
        """Sample on a worker thread (NVML and /proc reads block) and publish on the loop."""
        loop = asyncio.get_running_loop()
        while True:
            engine_pid = self.engine.pid if self.engine and not self.engine.exited.done() else None
            generation = self._generation_view()
            sample = await loop.run_in_executor(None, lambda: self.telemetry.sample(engine_pid=engine_pid, generation=generation))
            self.publish("telemetry", sample)
            split = self.model.get("split") or {}
            for alarm in self.alarms.update(sample, generating=self.in_flight is not None, cpu_side_need_bytes=split.get("cpu_bytes")):
                log.warning("alarm %s %s: %s", alarm["kind"], "on" if alarm["active"] else "off", alarm["message"])
                self.publish("alarm", alarm)
            await self._until_next_sample()

    async def _until_next_sample(self) -> None:
        """The interval, or less: a new subscriber gets a fresh sample at once."""
        watched = self.subscribers or self.in_flight or self.pending or self.model.get("state") == "loading"
        interval = self.settings.telemetry_interval_s
        if not watched:
            interval = max(interval, self.settings.unwatched_telemetry_interval_s)
        self._new_subscriber.clear()
        try:
            await asyncio.wait_for(self._new_subscriber.wait(), interval)
        except TimeoutError:
            pass

    def _generation_view(self) -> dict[str, Any]:
        """Speed now (the reply in flight) and of the latest finished reply."""
        view: dict[str, Any] = {"generating": self.in_flight is not None, "tokens_per_s": None}
        flight = self.in_flight
        if flight and flight.first_token_at and flight.tokens > 1:
            elapsed = time.monotonic() - flight.first_token_at
            view["tokens_per_s"] = (flight.tokens - 1) / elapsed if elapsed > 0 else None
        if self.last_stats:
            view["last"] = {k: self.last_stats.get(k) for k in ("tokens_per_s", "prompt_tokens_per_s", "ttft_s", "generated_tokens")}
        return view

    # --- control socket -----------------------------------------------------------------------

    async def _serve_control(self, control: zmq.asyncio.Socket, prefix: bytes) -> None:
        while True:
            frames = await control.recv_multipart(copy=True)
            identity, payload = frames[0], frames[1:]
            reply = Replier(control, identity)
            if not self.rate_limiter.allow(prefix + identity):
                request_id = protocol.request_id_of(payload[0]) if len(payload) == 1 else None
                reply.error(request_id, ProtocolError("rate_limited", f"more than {RATE_PER_S:.0f} requests a second; slow down"))
                continue
            if len(payload) != 1:
                reply.error(None, ProtocolError("bad_request", "a request is exactly one frame"))
                continue
            try:
                request = protocol.decode_request(payload[0])
            except ProtocolError as error:
                reply.error(protocol.request_id_of(payload[0]), error)
                continue
            handler = self.handlers.get(request.type)
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                reply.error(request.id, ProtocolError("unknown_type", f"unknown request type {request.type!r}; known: {known}"))
            elif request.type == "load":  # minutes long: must not hold up other clients
                self._spawn(self._handle(handler, request, prefix + identity, reply))
            else:
                await self._handle(handler, request, prefix + identity, reply)

    async def _handle(self, handler: Callable[[Request, bytes], Awaitable[dict[str, Any]]], request: Request, client: bytes, reply: "Replier") -> None:
        try:
            body = await handler(request, client)
        except ProtocolError as error:
            reply.error(request.id, error)
        except NotFound as exc:
            reply.error(request.id, ProtocolError("not_found", str(exc.args[0])))
        except StoreError as exc:
            reply.error(request.id, ProtocolError("storage", str(exc)))
        except Exception:
            log.exception("handler for %r failed", request.type)
            reply.error(request.id, ProtocolError("internal", f"the daemon failed on {request.type!r}; see its log"))
        else:
            reply.ok(request.id, body)

    # --- handlers: session -------------------------------------------------------------------

    async def on_hello(self, request: Request, _identity: bytes) -> dict[str, Any]:
        client_version = field_of(request.body, "protocol", int)
        if client_version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(
                "protocol_mismatch",
                f"this daemon speaks protocol {protocol.PROTOCOL_VERSION}, the client {client_version}; "
                "install the same vramchat version on both sides",
            )
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "version": VERSION,
            "epoch": self.epoch,
            "pid": os.getpid(),
            "max_request_bytes": protocol.MAX_REQUEST_BYTES,
        }

    async def on_snapshot(self, _request: Request, _identity: bytes) -> dict[str, Any]:
        assert self.store
        in_flight = None
        if self.in_flight:
            in_flight = {
                "request": self.in_flight.job.request_id,
                "conversation": self.in_flight.job.conversation_id,
                "message": self.in_flight.message_id,
                "text": self.in_flight.text,
            }
        history = self.telemetry.history()  # once: the sampler thread may add one meanwhile
        return {
            "epoch": self.epoch,
            "seq": self.seq,
            "model": self.model,
            "conversations": self.store.list_conversations(),
            "in_flight": in_flight,
            "queue": self._queue_state(),
            "clients": self.subscribers,
            "telemetry": {"latest": history[-1] if history else None, "history": history},
            "alarms": list(self.alarms.active.values()),
        }

    async def on_status(self, _request: Request, _identity: bytes) -> dict[str, Any]:
        return {
            "daemon": {
                "version": VERSION,
                "pid": os.getpid(),
                "epoch": self.epoch,
                "uptime_s": time.time() - self.started_at,
                "clients": self.subscribers,
                "runtime_dir": str(self.settings.runtime_dir),
                "data_dir": str(self.settings.data_dir),
            },
            "model": self.model,
            "queue": self._queue_state(),
            "telemetry": self.telemetry.latest(),
            "alarms": list(self.alarms.active.values()),
        }

    async def on_models(self, _request: Request, _identity: bytes) -> dict[str, Any]:
        found = models.discover(self.config.model_dirs)
        loaded = self.model.get("path") if self.model.get("state") == "ready" else None
        for model in found:
            model["loaded"] = model["path"] == loaded
        return {"models": found, "model_dirs": [str(d) for d in self.config.model_dirs]}

    # --- handlers: models ----------------------------------------------------------------------

    async def on_load(self, request: Request, _identity: bytes) -> dict[str, Any]:
        return await self.load(request.body)

    async def load(self, body: dict[str, Any], *, trusted: bool = False) -> dict[str, Any]:
        """Validate and plan, then replace the engine with a fresh one holding the requested model.

        `trusted` is for the daemon's own command line and config, which may name any path.
        """
        params = self._load_params(body, trusted)
        # Reading a GGUF's header takes seconds for a big vocabulary: keep it off the loop.
        params["plan"] = await asyncio.get_running_loop().run_in_executor(None, self._plan, params, body)
        params["n_gpu_layers"] = params["plan"]["n_gpu_layers"]
        if self._load_lock.locked():
            raise ProtocolError("busy", "another load is in progress; wait for it to finish")
        async with self._load_lock:
            return await self._swap_engine(params)

    def _load_params(self, body: dict[str, Any], trusted: bool) -> dict[str, Any]:
        name = field_of(body, "model", str)
        path = models.resolve(name, self.config.model_dirs, allow_any_path=trusted or self.config.allow_any_model_path)
        n_gpu_layers = field_of(body, "n_gpu_layers", (int, str), self.config.n_gpu_layers)
        if n_gpu_layers != "auto" and (not isinstance(n_gpu_layers, int) or n_gpu_layers < 0):
            raise ProtocolError("invalid_value", f'n_gpu_layers must be a whole number >= 0 or "auto", not {n_gpu_layers!r}')
        n_ctx = field_of(body, "n_ctx", int, self.config.n_ctx)
        if not 16 <= n_ctx <= 1 << 20:
            raise ProtocolError("invalid_value", f"n_ctx must be between 16 and 1048576 tokens, not {n_ctx}")
        cpus = os.cpu_count() or 1
        n_threads = field_of(body, "n_threads", int, self.config.n_threads or cpus)
        if not 1 <= n_threads <= cpus:
            raise ProtocolError("invalid_value", f"n_threads must be between 1 and this machine's {cpus} CPUs, not {n_threads}")
        return {"model_path": str(path), "n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx, "n_threads": n_threads,
                "state_cache_bytes": self.config.state_cache_mib << 20}

    def _plan(self, params: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """Check n_gpu_layers against the model, resolve "auto", and refuse a load that would swap."""
        try:
            info = inspect_cached(params["model_path"])
        except GGUFError as exc:
            raise ProtocolError("not_gguf", str(exc)) from None
        host = Machine.from_sample(self.telemetry.latest() or self.telemetry.sample(engine_pid=None))
        settings = PlanSettings(n_ctx=params["n_ctx"], has_gpu=host.has_gpu)
        budget_text = field_of(body, "vram_budget", (int, str), None)
        try:
            budget = parse_size(budget_text) if isinstance(budget_text, str) else budget_text
        except ValueError as exc:
            raise ProtocolError("invalid_value", str(exc)) from None
        if budget is None:
            budget = max(0, host.free_vram - DEFAULT_VRAM_MARGIN)
        layers = params["n_gpu_layers"]
        if layers == "auto":
            layers = fit(info, budget, settings).n_gpu_layers
        elif layers > info.n_layer + 1:
            raise ProtocolError(
                "invalid_value",
                f"n_gpu_layers {layers} is more than this model has: {info.n_layer} layers + the output layer; "
                f'choose 0..{info.n_layer + 1}, or "auto" to fit the VRAM budget',
            )
        prediction = predict(info, layers, settings)
        prediction.tokens_per_s = estimate_tokens_per_second(prediction, ram_bandwidth(), gpu_bandwidth_for(host.gpu_name))
        swap = swap_check(prediction, host.available_ram)
        if swap.would_swap and not field_of(body, "force", bool, False):
            raise ProtocolError("would_swap", swap.message)
        return {"n_gpu_layers": layers, "vram_budget": budget, "prediction": prediction.to_dict(), "swap": swap.to_dict()}

    async def _swap_engine(self, params: dict[str, Any]) -> dict[str, Any]:
        self._model_ready.clear()
        self._set_model(
            state="loading", progress=0.0, error=None, reloading=False, path=params["model_path"], plan=params.get("plan"), name=Path(params["model_path"]).name,
            n_gpu_layers=params["n_gpu_layers"], n_ctx=params["n_ctx"], n_threads=params["n_threads"],
        )
        if self.in_flight:
            self._cancel_running("a new model was loaded")
        async with self._engine_lock:
            if self.engine:
                await self.engine.stop()
                self.engine = None
            try:
                engine_params = {k: v for k, v in params.items() if k != "plan"}
                engine, ready = await launch(
                    self.context, self.settings.runtime_dir, engine_params, lambda f: self._set_model(progress=round(f, 3))
                )
            except LoadFailed as exc:
                self._set_model(state="error", error=str(exc), progress=None)
                raise ProtocolError("load_failed", f"could not load {Path(params['model_path']).name}: {exc}") from None
            self.engine = engine
            self.last_load_params = params
            self._spawn(self._watch_engine(engine))
            self._set_model(
                state="ready", progress=1.0, engine_pid=engine.pid, n_ctx=ready["n_ctx"],
                load_seconds=ready["load_seconds"], chat_template=ready["chat_template"],
                split=parse_load_log(ready["load_log"]).to_dict(),
            )
            self._model_ready.set()
        log.info("loaded %s in %.2f s", params["model_path"], ready["load_seconds"])
        return {"model": self.model}

    async def _watch_engine(self, engine: EngineProcess) -> None:
        returncode = await engine.exited
        if engine.stopping or self._stopping.is_set():
            return
        self._model_ready.clear()
        reason = f"the engine {describe_exit(returncode)}"
        now = time.monotonic()
        self._crash_times = [t for t in self._crash_times if now - t < CRASH_WINDOW_S] + [now]
        reloading = bool(self.last_load_params) and len(self._crash_times) <= MAX_AUTO_RELOADS
        self._set_model(state="crashed", error=reason, engine_pid=None, reloading=reloading)
        if reloading:
            log.warning("%s; reloading %s", reason, self.last_load_params["model_path"])
            async with self._load_lock:
                if self.engine is engine:  # nobody loaded another model meanwhile
                    self.engine = None
                    try:
                        await self._swap_engine(self.last_load_params)
                    except ProtocolError as exc:
                        log.error("automatic reload failed: %s", exc.message)
        else:
            log.error("%s; %d crashes in %.0f s, not reloading by itself: run `vramchat load`",
                      reason, len(self._crash_times), CRASH_WINDOW_S)

    # --- handlers: conversations ---------------------------------------------------------------

    async def on_conversation_create(self, request: Request, _identity: bytes) -> dict[str, Any]:
        assert self.store
        conversation = self.store.create_conversation(
            title=field_of(request.body, "title", str, "New conversation"),
            system_prompt=field_of(request.body, "system_prompt", str, ""),
            settings=_sampling(field_of(request.body, "settings", dict, {})),
        )
        self.publish("conversation", {"action": "created", "conversation": conversation})
        return {"conversation": conversation}

    async def on_conversation_list(self, _request: Request, _identity: bytes) -> dict[str, Any]:
        assert self.store
        return {"conversations": self.store.list_conversations()}

    async def on_conversation_get(self, request: Request, _identity: bytes) -> dict[str, Any]:
        assert self.store
        conversation_id = self.store.resolve_conversation(field_of(request.body, "id", str))
        return {"conversation": self.store.get_conversation(conversation_id), "messages": self.store.messages(conversation_id)}

    async def on_conversation_update(self, request: Request, _identity: bytes) -> dict[str, Any]:
        assert self.store
        body = request.body
        conversation_id = self.store.resolve_conversation(field_of(body, "id", str))
        settings = field_of(body, "settings", dict, None)
        conversation = self.store.update_conversation(
            conversation_id,
            title=field_of(body, "title", str, None),
            system_prompt=field_of(body, "system_prompt", str, None),
            settings=_sampling(settings) if settings is not None else None,
        )
        self.publish("conversation", {"action": "updated", "conversation": conversation})
        return {"conversation": conversation}

    async def on_conversation_delete(self, request: Request, _identity: bytes) -> dict[str, Any]:
        assert self.store
        conversation_id = self.store.resolve_conversation(field_of(request.body, "id", str))
        if (self.in_flight and self.in_flight.job.conversation_id == conversation_id) or any(
            job.conversation_id == conversation_id for job in self.pending
        ):
            raise ProtocolError("busy", "this conversation has a reply queued or generating; cancel it first")
        self.store.delete_conversation(conversation_id)
        self.publish("conversation", {"action": "deleted", "conversation": {"id": conversation_id}})
        return {"deleted": conversation_id}

    # --- handlers: generation ------------------------------------------------------------------

    async def on_chat(self, request: Request, identity: bytes) -> dict[str, Any]:
        assert self.store
        body = request.body
        content = field_of(body, "content", str)
        if not content.strip():
            raise ProtocolError("invalid_value", "the message is empty")
        sampling = _sampling(field_of(body, "sampling", dict, {}))
        self._check_model_available()
        self._check_queue_room(identity)
        if conversation_ref := field_of(body, "conversation", str, None):
            conversation = self.store.get_conversation(self.store.resolve_conversation(conversation_ref))
        else:
            conversation = self.store.create_conversation(title=_title_from(content))
            self.publish("conversation", {"action": "created", "conversation": conversation})
        user_message = self.store.add_message(conversation["id"], "user", content)
        self.publish("msg", user_message)
        return self._enqueue(request.id, conversation["id"], identity, sampling, user_message)

    async def on_regenerate(self, request: Request, identity: bytes) -> dict[str, Any]:
        """Drop the last reply of a conversation and queue a new one for the same question."""
        assert self.store
        conversation_id = self.store.resolve_conversation(field_of(request.body, "conversation", str))
        if (self.in_flight and self.in_flight.job.conversation_id == conversation_id) or any(
            job.conversation_id == conversation_id for job in self.pending
        ):
            raise ProtocolError("busy", "this conversation already has a reply queued or generating")
        self._check_model_available()
        self._check_queue_room(identity)
        messages = self.store.messages(conversation_id)
        if not messages or not any(m["role"] == "user" for m in messages):
            raise ProtocolError("invalid_value", "there is no message to answer again in this conversation")
        if messages[-1]["role"] == "assistant":
            self.store.delete_message(messages[-1]["id"])
            self.publish("msg", {**messages[-1], "status": "deleted"})
        sampling = _sampling(field_of(request.body, "sampling", dict, {}))
        return self._enqueue(request.id, conversation_id, identity, sampling, None)

    def _model_available(self) -> bool:
        state = self.model.get("state")
        return state in ("loading", "ready") or (state == "crashed" and bool(self.model.get("reloading")))

    def _check_model_available(self) -> None:
        if not self._model_available():
            reason = f" ({self.model['error']})" if self.model.get("error") else ""
            raise ProtocolError("no_model", f"no model is loaded{reason}: load one with `vramchat load MODEL`")

    def _check_queue_room(self, identity: bytes) -> None:
        if len(self.pending) >= MAX_QUEUED_TOTAL:
            raise ProtocolError("queue_full", f"{len(self.pending)} requests are queued, the most the daemon holds; retry later")
        mine = sum(1 for job in self.pending if job.client == identity)
        if mine >= MAX_QUEUED_PER_CLIENT:
            raise ProtocolError("queue_full", f"you have {mine} requests queued, the most one client may; wait for some to finish")

    def _enqueue(self, request_id: str, conversation_id: str, identity: bytes, sampling: dict[str, Any], user_message: dict[str, Any] | None) -> dict[str, Any]:
        if any(job.request_id == request_id for job in self.pending) or (self.in_flight and self.in_flight.job.request_id == request_id):
            raise ProtocolError("bad_request", f"request id {request_id!r} is already queued; use a fresh id per request")
        self.pending.append(Job(request_id, conversation_id, identity, sampling))
        self._queue_changed.set()
        self._publish_queue()
        return {
            "request": request_id,
            "conversation": conversation_id,
            "user_message": user_message,
            "position": len(self.pending) + (1 if self.in_flight else 0),
        }

    async def on_cancel(self, request: Request, _identity: bytes) -> dict[str, Any]:
        target = field_of(request.body, "request", str)
        if self.in_flight and self.in_flight.job.request_id == target:
            self._cancel_running("cancelled by a client")
            return {"cancelled": "running"}
        for job in self.pending:
            if job.request_id == target:
                self.pending.remove(job)
                self._publish_queue()
                return {"cancelled": "queued"}
        raise ProtocolError("not_found", f"request {target!r} is neither queued nor running (it may have finished)")

    def _cancel_running(self, reason: str) -> None:
        if self.in_flight and not self.in_flight.cancel_requested and self.engine:
            self.in_flight.cancel_requested = True
            self.in_flight.cancel_reason = reason
            self.engine.send({"op": "cancel", "request": self.in_flight.job.request_id})

    # --- the generation worker -----------------------------------------------------------------

    async def _generation_worker(self) -> None:
        """Runs queued requests one at a time, in arrival order."""
        while True:
            if not self.pending:
                self._queue_changed.clear()
                await self._queue_changed.wait()
                continue
            if not self._model_available():
                self._fail_job(self.pending.popleft(), "no model is loaded: load one with `vramchat load MODEL`")
                continue
            await self._model_ready.wait()
            async with self._engine_lock:
                if not self._model_ready.is_set() or not self.pending or self.engine is None:
                    continue
                job = self.pending.popleft()
                await self._run_job(job, self.engine)

    def _fail_job(self, job: Job, error: str) -> None:
        assert self.store
        message = self.store.add_message(job.conversation_id, "assistant", "", status="error")
        self.store.update_message(message["id"], error=error)
        self.publish("msg", {**self.store.get_message(message["id"]), "request": job.request_id})
        self._publish_queue()

    async def _run_job(self, job: Job, engine: EngineProcess) -> None:
        assert self.store
        try:
            conversation = self.store.get_conversation(job.conversation_id)
        except NotFound:
            self._publish_queue()
            return
        history = self.store.messages(job.conversation_id)
        message = self.store.add_message(job.conversation_id, "assistant", "", status="generating", model=self.model.get("name"))
        self.in_flight = flight = InFlight(job, message["id"])
        self.publish("msg", {**message, "request": job.request_id})
        self._publish_queue()

        defaults = models.defaults_for(Path(self.model["path"]))
        system_prompt = conversation["system_prompt"] or defaults.get("system_prompt")
        prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
        prompt += [{"role": m["role"], "content": m["content"]} for m in history if m["content"]]
        sampling = {**defaults.get("sampling", {}), **conversation["settings"], **job.sampling}
        engine.send({"op": "generate", "request": job.request_id, "conversation": job.conversation_id,
                     "messages": prompt, "sampling": sampling})

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
                self.publish("tok", {"request": job.request_id, "conversation": job.conversation_id,
                                     "message": message["id"], "index": index, "text": event["text"],
                                     "t_engine": event.get("t")})
                index += 1
                if time.monotonic() - last_flush > REPLY_FLUSH_INTERVAL_S:
                    self.store.update_message(message["id"], content=flight.text)
                    last_flush = time.monotonic()
            elif kind == "done" and event["request"] == job.request_id:
                stats = self.last_stats = {**event["stats"], "finish_reason": event["finish_reason"]}
                if stats["state_cache_bytes"] != self.model.get("state_cache_bytes"):
                    self._set_model(state_cache_bytes=stats["state_cache_bytes"])
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
        self.publish("msg", {**self.store.get_message(message["id"]), "request": job.request_id})
        self._publish_queue()


@dataclass(frozen=True)
class Replier:
    """Sends the one reply a request gets, on the socket it came in on."""

    socket: zmq.asyncio.Socket
    identity: bytes

    def ok(self, request_id: str, body: dict[str, Any]) -> None:
        self._send(protocol.encode_reply(request_id, body))

    def error(self, request_id: str | None, error: ProtocolError) -> None:
        self._send(protocol.encode_error(request_id, error))

    def _send(self, frame: bytes) -> None:
        try:
            self.socket.send_multipart([self.identity, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone, or not reading: its loss, not ours
            log.debug("reply not sent: %s", exc)


def _checked_ipc_path(path: Path) -> Path:
    if len(str(path)) > 100:
        raise SystemExit(f"socket path {path} is too long for a Unix socket; use a shorter --runtime-dir")
    path.unlink(missing_ok=True)
    return path


def _model_status_line(model: dict[str, Any]) -> str:
    """One line for `systemctl status`."""
    state, name = model.get("state"), model.get("name") or "no model"
    if state == "ready":
        return f"serving {name} ({model.get('n_gpu_layers')} GPU layers, n_ctx {model.get('n_ctx')})"
    if state in ("error", "crashed"):
        return f"{state}: {model.get('error')}"
    return f"{state} {name}"


def _job_view(job: Job, position: int) -> dict[str, Any]:
    return {"request": job.request_id, "conversation": job.conversation_id, "position": position, "enqueued_at": job.enqueued_at}


def _sampling(raw: dict[str, Any]) -> dict[str, Any]:
    """Keep the known sampling fields, with their types checked."""
    sampling = {}
    for name, kind in SAMPLING_FIELDS.items():
        if name in raw and raw[name] is not None:
            sampling[name] = field_of(raw, name, (int, float) if kind is float else int)
    if "max_tokens" in sampling and sampling["max_tokens"] < 1:
        raise ProtocolError("invalid_value", "max_tokens must be at least 1")
    if "temperature" in sampling and not 0 <= sampling["temperature"] <= 5:
        raise ProtocolError("invalid_value", "temperature must be between 0 and 5")
    return sampling


def _title_from(content: str) -> str:
    first_line = content.strip().splitlines()[0]
    return first_line[:60] + ("…" if len(first_line) > 60 else "")


def _take_instance_lock(runtime_dir: Path) -> Any:
    """One daemon per runtime dir: a second one would steal the first one's sockets."""
    lock = (runtime_dir / "vramchatd.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise SystemExit(f"another vramchatd (pid {holder}) already serves {runtime_dir}; stop it first") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock
