"""keep_alive, as Ollama names it: after so long without a request, the engine exits and its VRAM
and RAM go back to the machine; the next request loads the same model again (ModelLifecycle.wake)."""

from __future__ import annotations

import asyncio
import time

from vramchat.daemon.generation import GenerationQueue
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.shared.units import format_duration


async def unload_when_idle(model: ModelLifecycle, generation: GenerationQueue, keep_alive_s: float) -> None:
    """Unload the model once nothing has used it for `keep_alive_s` (0: as soon as a reply ends)."""
    check_every = min(1.0, max(0.1, keep_alive_s / 10))
    reason = f"after {format_duration(keep_alive_s)} without a request (keep_alive)"
    while True:
        await asyncio.sleep(check_every)
        busy = generation.in_flight is not None or generation.pending
        if model.state.state == "ready" and not busy and time.monotonic() - model.last_used >= keep_alive_s:
            await model.unload(reason, idle_for=keep_alive_s)
