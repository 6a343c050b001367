"""The telemetry loop: when to sample, publishing each sample, and raising or clearing alarms."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from vramchat.daemon.events import EventBus
from vramchat.daemon.generation import GenerationQueue
from vramchat.daemon.model_lifecycle import ModelLifecycle
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
            self.bus.publish("telemetry", sample)
            split = self.model.state.split or {}
            generating = self.generation.in_flight is not None
            for alarm in self.alarms.update(sample, generating=generating, cpu_side_need_bytes=split.get("cpu_bytes")):
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
