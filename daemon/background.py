"""The daemon's background tasks: one-off ones (a load), and long-running ones that are started
again when they die (the control loops, the generation worker, the telemetry loop, ...).

A long-running task that raises would otherwise end silently, and what it served would stop for
everybody: a dead generation worker leaves every later chat queued forever. Each restart is logged
and counted, and `status` shows the count and the last error (`daemon.tasks`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

# Wait this long before the first restart, doubling up to RESTART_MAX_DELAY_S while a task keeps
# dying; a task that ran for HEALTHY_AFTER_S before dying starts from the first delay again.
RESTART_FIRST_DELAY_S = 0.1
RESTART_MAX_DELAY_S = 5.0
HEALTHY_AFTER_S = 30.0


@dataclass
class TaskHealth:
    """What `status` says about one long-running task."""

    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # time.time()


class BackgroundTasks:
    """Keeps a reference to every task (asyncio keeps only weak ones) and supervises the long ones."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.health: dict[str, TaskHealth] = {}

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a one-off task; an error it raises is logged."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def supervise(self, name: str, start: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run `start()` until it returns, starting it again whenever it raises."""
        health = self.health.setdefault(name, TaskHealth())

        async def run() -> None:
            delay = RESTART_FIRST_DELAY_S
            while True:
                started = time.monotonic()
                try:
                    await start()
                    return  # done: the watchdog, say, when systemd asked for none
                except Exception as exc:
                    log.exception("background task %s failed; starting it again", name)
                    health.last_error, health.last_error_at = f"{type(exc).__name__}: {exc}", time.time()
                health.restarts += 1
                delay = RESTART_FIRST_DELAY_S if time.monotonic() - started > HEALTHY_AFTER_S else delay
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX_DELAY_S)

        self.spawn(run())

    def report(self) -> dict[str, dict[str, Any]]:
        """Every supervised task by name, for `status`."""
        return {name: asdict(health) for name, health in self.health.items()}

    def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
