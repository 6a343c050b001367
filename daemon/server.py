"""vramchatd's start-up and shutdown: it builds the daemon's parts, wires them together and runs them.

The daemon owns the conversations and the engine's lifecycle, and it stays up whatever a client
or the engine does: every handler error becomes an error reply (handlers.py), and an engine crash
becomes a `model` event, an `interrupted` reply and an automatic reload (model_lifecycle.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import zmq.asyncio

from vramchat.daemon.background import BackgroundTasks
from vramchat.daemon.downloads import Downloads
from vramchat.daemon.events import EventBus
from vramchat.daemon.generation import GenerationQueue
from vramchat.daemon.handlers import DaemonInfo, Handlers
from vramchat.daemon.http_api import HttpApi, parse_address
from vramchat.daemon.keep_alive import unload_when_idle
from vramchat.daemon.metrics import DaemonMetrics
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.daemon.monitor import Monitor
from vramchat.daemon.notify import Notifier
from vramchat.daemon.store import Store
from vramchat.daemon.telemetry import TelemetrySampler
from vramchat.daemon.transport import Transport, take_instance_lock
from vramchat.shared import __version__, api_key
from vramchat.shared.config import Config
from vramchat.shared.paths import ensure_private_dir
from vramchat.shared.rpc_endpoints import TUNNEL_HINT, is_loopback, parse_endpoint

log = logging.getLogger(__name__)


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
    # "HOST:PORT" of the OpenAI-compatible HTTP API (daemon/http_api.py); off when None.
    http_listen: str | None = None
    telemetry_interval_s: float = 0.5
    # With no subscriber and no reply or load under way, samples only feed alarms, the status
    # line and the history a client gets when it attaches: an idle service, which runs all day,
    # takes them this often instead (docs/benchmarks.md, daemon footprint).
    unwatched_telemetry_interval_s: float = 5.0


class Daemon:
    def __init__(self, settings: DaemonSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.context = zmq.asyncio.Context()
        self.transport = Transport(self.context)
        self.bus = EventBus(self.transport.listeners)
        self.notifier = Notifier.from_env()  # also keeps NOTIFY_SOCKET away from the engine
        self._stopping = asyncio.Event()
        self.tasks = BackgroundTasks()
        sampler = TelemetrySampler(interval_s=settings.telemetry_interval_s)
        self.model = ModelLifecycle(
            config=settings.config,
            bus=self.bus,
            telemetry=sampler,
            notifier=self.notifier,
            spawn=self.tasks.spawn,
            stopping=self._stopping,
        )
        self.generation = GenerationQueue(store, self.bus, self.model, context_overflow=settings.config.context_overflow)
        self.model.cancel_running = self.generation.cancel_running
        self.monitor = Monitor(
            sampler,
            self.bus,
            self.model,
            self.generation,
            interval_s=settings.telemetry_interval_s,
            unwatched_interval_s=settings.unwatched_telemetry_interval_s,
        )
        info = DaemonInfo(settings.runtime_dir, settings.data_dir, settings.telemetry_interval_s, time.time())
        # Counted from the start, served by the HTTP API's /metrics when it is on.
        self.metrics = DaemonMetrics(model=self.model, generation=self.generation, sampler=sampler, started_at=info.started_at)
        self.generation.on_finished = lambda result: self.metrics.observe_reply(result.status, result.stats)
        self.http: HttpApi | None = None
        self.downloads = Downloads(bus=self.bus, config=settings.config, data_dir=settings.data_dir, sampler=sampler)
        self.handlers = Handlers(
            info=info,
            config=settings.config,
            store=store,
            bus=self.bus,
            model=self.model,
            generation=self.generation,
            monitor=self.monitor,
            tasks=self.tasks,
            downloads=self.downloads,
        )

    async def run(self) -> int:
        runtime_dir = ensure_private_dir(self.settings.runtime_dir, self.settings.socket_dir_mode)
        self._lock_file = take_instance_lock(runtime_dir)
        # Only now that no other daemon can be using the store: what was generating is lost.
        if interrupted := self.store.mark_interrupted():
            log.warning("marked %d reply(ies) interrupted by the previous daemon's end", interrupted)
        # HTTP first: its key exists, and its port is known to be free, before the control socket
        # appears, which is what clients and scripts wait for.
        if self.settings.http_listen:
            await self._start_http(self.settings.http_listen)
        self.transport.bind_ipc(runtime_dir, group_access=self.settings.socket_dir_mode != 0o700)
        if self.settings.tcp_listen:
            self.transport.bind_tcp(
                self.settings.tcp_listen, insecure=self.settings.insecure_tcp, data_dir=self.settings.data_dir
            )
        log.info("vramchatd %s listening in %s (epoch %s)", __version__, runtime_dir, self.bus.epoch)
        self._log_rpc_servers()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        supervise = self.tasks.supervise
        for index, listener in enumerate(self.transport.listeners):
            supervise(f"control-{listener.name}", functools.partial(self.transport.serve_control, index, self.handlers.dispatch))
            supervise(f"subscriptions-{listener.name}", functools.partial(self.bus.watch_subscriptions, listener.events))
        supervise("generation", self.generation.worker)
        supervise("telemetry", self.monitor.run)
        supervise("downloads", self.downloads.run)
        if (keep_alive_s := self.settings.config.keep_alive_s) is not None:
            supervise("keep-alive", functools.partial(unload_when_idle, self.model, self.generation, keep_alive_s))
        startup = self.model.startup_model(self.settings.startup_model) if self.settings.load_on_start else None
        if startup:
            self.model.load_in_background(startup)
        # READY before the load: a big model can take longer than systemd's start timeout.
        self.notifier.ready(f"listening in {runtime_dir}" + (f"; loading {startup}" if startup else ""))
        supervise("watchdog", self.notifier.watchdog_loop)

        await self._stopping.wait()
        await self._shutdown()
        return 0

    def _log_rpc_servers(self) -> None:
        servers = self.settings.config.rpc_servers
        if servers:
            log.info("offloading to the devices of RPC server(s) %s", ", ".join(servers))
        for server in servers:
            if not is_loopback(parse_endpoint(server)[0]):
                log.warning(
                    "RPC server %s is reached without encryption or authentication: the model's weights and every "
                    "prompt's activations cross the network in the clear; prefer an SSH tunnel (%s) and 127.0.0.1",
                    server,
                    TUNNEL_HINT,
                )

    async def _start_http(self, address: str) -> None:
        config = self.settings.config
        host, port = parse_address(address, allow_remote=config.http_allow_remote)
        try:
            key = api_key.read_or_create(self.settings.data_dir)
        except api_key.ApiKeyError as exc:
            raise SystemExit(str(exc)) from None
        self.http = HttpApi(
            host=host,
            port=port,
            key=key,
            store=self.store,
            model=self.model,
            generation=self.generation,
            rate_limiter=self.transport.rate_limiter,
            metrics=self.metrics,
        )
        try:
            await self.http.start()
        except OSError as exc:
            raise SystemExit(f"cannot serve HTTP on {address}: {exc.strerror}; is another server using the port?") from None

    async def _shutdown(self) -> None:
        """SIGTERM: let the running reply stop at the next token, store it, then exit."""
        log.info("stopping")
        self.notifier.stopping()
        if self.generation.in_flight:
            self.generation.cancel_running("the daemon was stopped")
            try:
                await asyncio.wait_for(self.model.engine_lock.acquire(), 10)
            except TimeoutError:
                log.warning("the running reply did not stop in 10 s; it will be marked interrupted")
        await self.model.stop()
        if self.http:
            await self.http.stop()
        self.tasks.cancel_all()
        self.transport.close(self.settings.runtime_dir)
        self.context.term()
        self.store.close()  # a reply still `generating` is marked interrupted at the next start
        self.notifier.close()
