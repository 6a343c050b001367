"""The loaded model: load parameters, the plan, replacing the engine, watching it, and its state."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from vramchat.daemon import model_files
from vramchat.daemon.events import EventBus
from vramchat.daemon.model_state import LoadParams, ModelState
from vramchat.daemon.notify import Notifier
from vramchat.daemon.rpc_probe import RpcProbeError, probe_rpc_devices, rpc_down_text, unanswering_rpc_servers
from vramchat.daemon.supervisor import EngineProcess, LoadFailed, describe_exit, launch
from vramchat.daemon.telemetry import TelemetrySampler
from vramchat.shared.config import Config
from vramchat.shared.exact import DryRunError, checked, dry_run
from vramchat.shared.gguf import GGUFError, GGUFInfo, inspect_cached
from vramchat.shared.llama_log import parse_load_log
from vramchat.shared.load_options import settings_from
from vramchat.shared.load_plan import LoadPlan, Machine, plan_load
from vramchat.shared.placement import OffloadDevice
from vramchat.shared.planner import PlanError, PlanSettings
from vramchat.shared.protocol import ProtocolError, field_of

log = logging.getLogger(__name__)

# After this many engine crashes within CRASH_WINDOW_S, stop reloading by itself.
MAX_AUTO_RELOADS = 3
CRASH_WINDOW_S = 300.0
Check = Callable[[], Awaitable[LoadParams]]  # a load's final parameters, made once the engine is stopped


class LoadRequest(NamedTuple):
    """A load request's checked fields, before the plan (ModelLifecycle._checked_request)."""

    path: Path
    n_gpu_layers: int | Literal["auto"]
    n_threads: int
    vram_budget: int | str | dict[str, Any] | None
    settings: PlanSettings
    info: GGUFInfo


class ModelLifecycle:
    """Owns the engine process and the model state; a model switch is an engine replacement.

    `engine_lock` is held by whoever drives the engine (the generation worker, a replacement), and
    `ready` is set while a loaded engine can take a request.
    """

    def __init__(
        self,
        *,
        config: Config,
        bus: EventBus,
        telemetry: TelemetrySampler,
        notifier: Notifier,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        stopping: asyncio.Event,
    ) -> None:
        self.config = config
        self.bus, self.telemetry, self.notifier = bus, telemetry, notifier
        self.spawn, self.stopping = spawn, stopping
        self.state = ModelState()
        self.engine: EngineProcess | None = None
        self.engine_lock = asyncio.Lock()
        self.ready = asyncio.Event()
        # Set by the daemon to the generation queue's: stops the reply in flight before a replacement.
        self.cancel_running: Callable[[str], None] = lambda reason: None
        self._last_load: LoadParams | None = None
        self._load_lock = asyncio.Lock()  # held while an engine is replaced, stopped or reloaded
        self._loads: list[asyncio.Future[None]] = []  # one per load request not yet ended, in arrival order
        self._crash_times: list[float] = []
        self.last_used = time.monotonic()  # when a reply last started or ended, or a load ended (keep_alive)

    def update(self, **changes: Any) -> None:
        """Change the model state and tell every client."""
        previous = self.state.state
        self.state = replace(self.state, **changes)
        self.bus.publish("model", self.state.to_wire())
        if self.state.state != previous:
            self.notifier.status(self.state.status_line())

    def state_cache_changed(self, used_bytes: int) -> None:
        """The engine's state cache now holds `used_bytes`: tell the clients if that is news."""
        if used_bytes != self.state.state_cache_bytes:
            self.update(state_cache_bytes=used_bytes)

    def known_models(self) -> list[dict[str, Any]]:
        """The model files it can load (model_files.discover), each saying whether it is the one loaded."""
        loaded = self.state.path if self.state.state == "ready" else None
        return [{**model, "loaded": model["path"] == loaded} for model in model_files.discover(self.config.model_dirs)]

    def startup_model(self, named: str | None) -> str | None:
        """The model to load at start: named on the command line, else the config's, else the demo."""
        name = named or self.config.default_model
        if name is None:
            demo = next((m for m in model_files.discover(self.config.model_dirs) if m["source"] == "demo"), None)
            name = demo["path"] if demo else None
        if name is None:
            log.info("no model to load at start: configure default_model, or install the demo model")
        return name

    def load_in_background(self, model: str) -> None:
        """The start-up load: requests arriving meanwhile wait for it; a failure is logged, not raised."""
        self.state = replace(self.state, state="loading", progress=0.0)

        async def load() -> None:
            try:
                await self.load({"model": model}, trusted=True)
            except ProtocolError as exc:
                log.error("could not load the start-up model: %s", exc.message)
                if self.state.state == "loading":
                    self.update(state="error", error=exc.message, progress=None)

        self.spawn(load())

    async def load(self, body: dict[str, Any], *, trusted: bool = False) -> dict[str, Any]:
        """Check, wait for the loads sent before this one, plan, check the plan with llama.cpp's
        dry run (shared/exact.py), then replace the engine with a fresh one holding the model.

        Loads run one at a time, in the order they came: one sent during the start-up load, or
        during another client's, waits for it and is then carried out, planned for the memory the
        one before it left. A request that could never load is refused at once instead.
        `trusted` is for the daemon's own command line and config, which may name any path.
        """
        loop = asyncio.get_running_loop()
        async with self._in_order() as my_turn:
            rpc_servers = self._rpc_servers(body)
            # Reading a GGUF's header takes seconds for a big vocabulary: keep it off the loop.
            await loop.run_in_executor(None, self._checked_request, body, trusted)
            await my_turn()
            async with self._load_lock:
                if down := await unanswering_rpc_servers(rpc_servers):
                    raise ProtocolError("load_failed", f"could not load {body.get('model')}: {rpc_down_text(down)}")
                plan = await loop.run_in_executor(None, self._checked_plan, body, trusted, rpc_servers)
                exact = functools.partial(loop.run_in_executor, None, self._exact_params, plan, rpc_servers, body)
                held = self._last_load.rpc_servers if self._last_load and self.engine and not self.engine.exited.done() else ()
                if set(rpc_servers) & set(held):  # an RPC server serves one client: the dry run would wait for this engine
                    return await self._replace_engine(self._params(plan, rpc_servers), exact)
                return await self._replace_engine(await exact())  # a failed dry run leaves the engine as it was

    @contextlib.asynccontextmanager
    async def _in_order(self) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Take a place in the line of loads and unloads: the function it gives waits until every
        one that came before has ended, however it ended."""
        earlier, mine = list(self._loads), asyncio.get_running_loop().create_future()
        self._loads.append(mine)

        async def my_turn() -> None:
            if earlier:
                await asyncio.wait(earlier)

        try:
            yield my_turn
        finally:
            mine.set_result(None)
            self._loads.remove(mine)

    def _checked_request(self, body: dict[str, Any], trusted: bool) -> LoadRequest:
        """The request's fields, checked, and the model file's header: all that does not depend on
        the memory free when the load's turn comes."""
        name = field_of(body, "model", str)
        path = model_files.resolve(name, self.config.model_dirs, allow_any_path=trusted or self.config.allow_any_model_path)
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
        budget = field_of(body, "vram_budget", (int, str, dict), None)
        field_of(body, "force", bool, False)
        try:
            settings = settings_from(body, self.config.load_defaults(), n_ctx, n_threads)
            info = inspect_cached(path)
        except GGUFError as exc:
            raise ProtocolError("not_gguf", str(exc)) from None
        except (PlanError, ValueError) as exc:
            raise ProtocolError("invalid_value", str(exc)) from None
        return LoadRequest(Path(info.path), n_gpu_layers, n_threads, budget, settings, info)  # a split set's first file

    def _checked_plan(self, body: dict[str, Any], trusted: bool, rpc_servers: tuple[str, ...]) -> LoadPlan:
        """Check the request, then plan by the formula: resolve "auto" and refuse a load that would swap."""
        _, n_gpu_layers, _, budget, settings, info = self._checked_request(body, trusted)
        try:
            sample = self.telemetry.latest() or self.telemetry.sample(engine_pid=None)
            host = Machine.from_sample(sample, self._rpc_offload_devices(rpc_servers))
            if self.config.ram_budget is not None:
                host = replace(host, available_ram=min(host.available_ram, self.config.ram_budget))
            plan = plan_load(info, host, n_gpu_layers, settings, vram_budget=budget)
        except GGUFError as exc:
            raise ProtocolError("not_gguf", str(exc)) from None
        except (PlanError, ValueError, RpcProbeError) as exc:
            raise ProtocolError("invalid_value", str(exc)) from None
        if plan.swap.would_swap and not field_of(body, "force", bool, False):
            raise ProtocolError("would_swap", plan.swap.message)
        return plan

    def _exact_params(self, plan: LoadPlan, rpc_servers: tuple[str, ...], body: dict[str, Any]) -> LoadParams:
        """The plan checked by llama.cpp's dry run (shared/exact.py), or load_failed with its reason."""
        try:
            plan = checked(plan, lambda layout: dry_run(layout.llama_load(rpc_servers)))
        except (DryRunError, PlanError) as exc:
            raise ProtocolError("load_failed", f"could not load {Path(plan.info.path).name}: {exc}") from None
        if plan.swap.would_swap and not field_of(body, "force", bool, False):
            raise ProtocolError("would_swap", plan.swap.message)
        return self._params(plan, rpc_servers)

    def _params(self, plan: LoadPlan, rpc_servers: tuple[str, ...]) -> LoadParams:
        n_threads, state_cache = plan.settings.n_threads or 1, self.config.state_cache_mib << 20
        return LoadParams(n_threads=n_threads, state_cache_bytes=state_cache, plan=plan.to_dict(), **plan.llama_load(rpc_servers))

    def _rpc_offload_devices(self, servers: tuple[str, ...]) -> list[OffloadDevice]:
        """The devices of the RPC servers a load will use, with the memory the load will find free.

        An RPC server serves one client at a time: the engine in use answers for the servers it
        is connected to (what it holds there is free again once it is replaced), and a probe
        process connects to the others.
        """
        engine, held = self.engine, self._last_load.rpc_servers if self._last_load else ()
        connected = engine is not None and not engine.exited.done()
        known = (engine.devices if engine and engine.devices else None) or self.state.rpc_devices or []
        buffers = (self.state.split or {}).get("buffers", [])

        def held_there(device: dict[str, Any]) -> int:
            return sum(b["bytes"] for b in buffers if b["device"] == device.get("buffer_name"))

        devices: list[OffloadDevice] = []
        for server in servers:
            if connected and server in held:
                devices += [OffloadDevice.from_rpc(d, held_there(d)) for d in known if d.get("endpoint") == server]
            else:
                devices += [OffloadDevice.from_rpc(d) for d in probe_rpc_devices(server)]
        # The engine numbers them RPC0, RPC1, ... in the order it registers the servers.
        return [replace(d, name=f"RPC{i}") for i, d in enumerate(devices)]

    def _rpc_servers(self, body: dict[str, Any]) -> tuple[str, ...]:
        """The load's RPC servers: the configured ones (rpc_servers, --rpc), or the body's choice
        among them. Only configured ones: the engine sends the model's weights to each."""
        configured = self.config.rpc_servers
        chosen = field_of(body, "rpc_servers", list, None)
        if chosen is None:
            return tuple(configured)
        for server in chosen:
            if server not in configured:
                raise ProtocolError(
                    "invalid_value",
                    f"RPC server {server!r} is not one this daemon is configured with "
                    f"({', '.join(configured) or 'none'}); add it to rpc_servers in the config or vramchatd --rpc",
                )
        return tuple(dict.fromkeys(chosen))

    async def _replace_engine(self, params: LoadParams, check: Check | None = None) -> dict[str, Any]:
        """Stop the engine (the only sure way to get its VRAM back) and start one with `params`, or
        with what `check` gives once the engine is gone (see `load`): if it fails, the model before."""
        self.ready.clear()
        self._announce(params)
        self.cancel_running("a new model was loaded")
        async with self.engine_lock:
            previous = self._last_load
            if self.engine:
                await self.engine.stop()
                self.engine = None
            if check is not None:
                try:
                    params = await check()
                except ProtocolError:
                    if previous is not None:
                        self._announce(previous)
                        with contextlib.suppress(ProtocolError):
                            await self._launch(previous)
                    raise
                self.update(plan=params.plan, n_gpu_layers=params.n_gpu_layers)
            ready = await self._launch(params)
        log.info("loaded %s in %.2f s", params.model_path, ready["load_seconds"])
        return {"model": self.state.to_wire()}

    def _announce(self, params: LoadParams) -> None:
        name = model_files.display_name(Path(params.model_path), self.config.model_dirs)
        load = {"name": name, "path": params.model_path, "plan": params.plan, "n_gpu_layers": params.n_gpu_layers}
        load |= {"n_ctx": params.n_ctx, "n_threads": params.n_threads, "rpc_devices": None, "unloaded_reason": None}
        self.update(state="loading", progress=0.0, error=None, reloading=False, **load)

    async def _launch(self, params: LoadParams) -> dict[str, Any]:
        """Start an engine with `params`, engine_lock held and no engine running; its `ready` event."""
        try:
            engine, ready = await launch(params.for_engine(), lambda fraction: self.update(progress=round(fraction, 3)))
        except LoadFailed as exc:
            self.update(state="error", error=str(exc), progress=None)
            raise ProtocolError("load_failed", f"could not load {Path(params.model_path).name}: {exc}") from None
        self.engine = engine
        engine.on_state_cache = self.state_cache_changed
        self._last_load = params
        self.spawn(self._watch(engine))
        self.update(
            state="ready",
            progress=1.0,
            engine_pid=engine.pid,
            n_ctx=ready["n_ctx"],
            load_seconds=ready["load_seconds"],
            chat_template=ready["chat_template"],
            split=parse_load_log(ready["load_log"]).to_dict(),
            rpc_devices=ready.get("rpc_devices") or None,
        )
        self.ready.set()
        self.last_used = time.monotonic()
        return ready

    async def _watch(self, engine: EngineProcess) -> None:
        """An engine that ends by itself has crashed: say so, and reload unless it keeps crashing."""
        returncode = await engine.exited
        if engine.stopping or self.stopping.is_set():
            return
        self.ready.clear()
        reason = f"the engine {describe_exit(returncode)}"
        now = time.monotonic()
        self._crash_times = [t for t in self._crash_times if now - t < CRASH_WINDOW_S] + [now]
        last_load = self._last_load
        reloading = last_load is not None and len(self._crash_times) <= MAX_AUTO_RELOADS
        if last_load is not None and (down := await unanswering_rpc_servers(last_load.rpc_servers)):
            # llama.cpp aborts an engine whose RPC server went away: a reload would fail the same way.
            reason += f": {rpc_down_text(down, self.state.rpc_devices, stopped=True)}"
            self.update(state="crashed", error=reason, engine_pid=None, reloading=False)
            log.error("%s", reason)
            return
        self.update(state="crashed", error=reason, engine_pid=None, reloading=reloading)
        if last_load is None or not reloading:
            log.error(
                "%s; %d crashes in %.0f s, not reloading by itself: run `vramchat load`",
                reason,
                len(self._crash_times),
                CRASH_WINDOW_S,
            )
            return
        log.warning("%s; reloading %s", reason, last_load.model_path)
        async with self._load_lock:
            if self.engine is engine:  # nobody loaded another model meanwhile
                self.engine = None
                try:
                    await self._replace_engine(last_load)
                except ProtocolError as exc:
                    log.error("automatic reload failed: %s", exc.message)

    async def unload(self, reason: str, *, idle_for: float | None = None) -> dict[str, Any]:
        """Stop the engine, which gives back all its VRAM and RAM, and keep what it loaded: the
        next request loads the same model again with the same settings (`wake`). Loads sent
        before this one go first. A reply in flight is cancelled and kept, unless `idle_for` is
        given (keep_alive): then only a model unused for that long is unloaded."""
        async with self._in_order() as my_turn:
            await my_turn()
            async with self._load_lock:
                if self.state.state != "ready" or self._last_load is None:
                    return {"model": self.state.to_wire(), "unloaded": False}
                if idle_for is None:
                    self.cancel_running(f"the model was unloaded {reason}")
                async with self.engine_lock:
                    if idle_for is not None and time.monotonic() - self.last_used < idle_for:
                        return {"model": self.state.to_wire(), "unloaded": False}  # a reply came meanwhile
                    self.ready.clear()
                    if self.engine:
                        await self.engine.stop()
                        self.engine = None
                    self.update(
                        state="unloaded",
                        unloaded_reason=reason,
                        engine_pid=None,
                        progress=None,
                        split=None,
                        state_cache_bytes=None,
                    )
        log.info("unloaded %s %s", self.state.name, reason)
        return {"model": self.state.to_wire(), "unloaded": True}

    async def wake(self) -> None:
        """Load the unloaded model again, as it was: a request is waiting for it. A failure leaves
        the state `error`, with the reason, and the waiting requests get it."""
        async with self._load_lock:
            if self.state.state != "unloaded" or self._last_load is None:
                return
            log.info("a request came: loading %s again", self._last_load.model_path)
            try:
                await self._replace_engine(self._last_load)
            except ProtocolError as exc:
                log.error("could not load the unloaded model again: %s", exc.message)

    async def stop(self) -> None:
        if self.engine:
            await self.engine.stop()
