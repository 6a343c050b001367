"""The telemetry loop: when to sample, publishing each sample, and raising or clearing alarms."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

from vramchat.daemon.events import EventBus
from vramchat.daemon.generation import GenerationQueue
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.daemon.model_state import ModelState
from vramchat.daemon.telemetry import AlarmTracker, TelemetrySampler

log = logging.getLogger(__name__)


class Monitor:
    """Samples at `interval_s` while anyone watches or anything runs, else at `unwatched_interval_s`:
    an idle service, which runs all day, then costs next to nothing (docs/benchmarks.md, footprint)."""

    def __init__(
        self,
        sampler: TelemetrySampler,
        bus: EventBus,
        model: ModelLifecycle,
        generation: GenerationQueue,
        *,
        interval_s: float,
        unwatched_interval_s: float,
    ) -> None:
        self.sampler, self.bus, self.model, self.generation = sampler, bus, model, generation
        self.interval_s, self.unwatched_interval_s = interval_s, unwatched_interval_s
        self.alarms = AlarmTracker()

    async def run(self) -> None:
        """Sample on a worker thread (NVML and /proc reads block) and publish on the loop."""
        loop = asyncio.get_running_loop()
        while True:
            engine = self.model.engine
            engine_pid = engine.pid if engine and not engine.exited.done() else None
            speed = self.generation.speed()
            sample = await loop.run_in_executor(
                None, functools.partial(self.sampler.sample, engine_pid=engine_pid, generation=speed)
            )
            sample["devices"] = devices_view(sample, self.model.state, engine.devices if engine else None)
            if engine is not None and engine_pid is not None and self.model.state.rpc_devices:
                engine.send({"op": "devices"})  # read by the next sample: RPC memory takes a round trip
            self.bus.publish("telemetry", sample)
            generating = self.generation.in_flight is not None
            for alarm in self.alarms.update(sample, generating=generating, cpu_side_need_bytes=resident_need(self.model.state)):
                log.warning("alarm %s %s: %s", alarm["kind"], "on" if alarm["active"] else "off", alarm["message"])
                self.bus.publish("alarm", alarm)
            await self._until_next_sample()

    async def _until_next_sample(self) -> None:
        """The interval, or less: a new subscriber gets a fresh sample at once."""
        watched = (
            self.bus.subscribers or self.generation.in_flight or self.generation.pending or self.model.state.state == "loading"
        )
        interval = self.interval_s if watched else max(self.interval_s, self.unwatched_interval_s)
        self.bus.new_subscriber.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.bus.new_subscriber.wait(), interval)


def resident_need(model: ModelState) -> int | None:
    """RAM the loaded model must keep resident: the plan's figure (planner.RamTerms), else what
    llama.cpp logged on the CPU side (a load planned before RamTerms existed); none while unloaded."""
    if model.state == "unloaded":
        return None
    ram = ((model.plan or {}).get("prediction") or {}).get("ram")
    if ram:
        return int(ram["anonymous"] + ram["mapped_read"])
    cpu: int | None = (model.split or {}).get("cpu_bytes")
    return cpu


def devices_view(sample: dict[str, Any], model: ModelState, engine_devices: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Every device the model can use, for the sample's `devices`: its kind (CUDA, RPC, CPU), total
    and free memory, and what llama.cpp allocated there at load (the split's buffers).

    NVIDIA GPUs come from NVML, here and now. RPC devices come from the engine's latest reading
    (or the one it made when it connected): the daemon never links llama.cpp itself.
    """
    buffers = (model.split or {}).get("buffers") or []

    def allocated(prefix: str) -> int:
        return sum(b["bytes"] for b in buffers if b["device"].startswith(prefix))

    devices = [
        {
            "name": f"CUDA{gpu['index']}",  # llama.cpp's name, when CUDA and NVML number the GPUs alike
            "kind": "CUDA",
            "description": gpu.get("name"),
            "memory_total": gpu.get("memory_total"),
            "memory_free": gpu.get("memory_free"),
            "allocated": allocated(f"CUDA{gpu['index']}"),
            "endpoint": None,
        }
        for gpu in sample["gpus"]
    ]
    remote = [d for d in engine_devices or model.rpc_devices or [] if d.get("endpoint")]
    devices += [
        {
            "name": d["name"],
            "kind": "RPC",
            "description": d.get("description"),
            "memory_total": d.get("memory_total"),
            "memory_free": d.get("memory_free"),
            "allocated": allocated(d["buffer_name"]),  # RPC0[host:port] in the load log
            "endpoint": d["endpoint"],
            "buffer_name": d.get("buffer_name"),
        }
        for d in remote
    ]
    host = sample["host"]
    devices.append(
        {
            "name": "CPU",
            "kind": "CPU",
            "description": "host RAM",
            "memory_total": host.get("ram_total"),
            "memory_free": host.get("ram_available"),
            "allocated": allocated("CPU"),
            "endpoint": None,
        }
    )
    return devices
