"""Model switch: from a `load` request to the first token of the new model, against building
the same `Llama()` in this process and generating its first token for the same messages.

The daemon holds another model (a tiny random GGUF) before each timed switch, so every switch
stops one engine process and starts another, as a real switch does. The daemon figure is split
into the engine's own `Llama()` time (`load_seconds` in the model state), the first token after
the load reply, and the rest: stopping the old engine, starting a Python process and importing
llama_cpp. No target was set for this one; the design pays for a fresh process on every load
because that is the only way to be sure VRAM is released.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CPUS, DirectModel, chat_and_collect, daemon, demo_model, loadavg, median, wait_ready
from vramchat.daemon.model_files import DEMO_DEFAULTS
from vramchat.shared.client import Client

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from gguf_factory import write_tiny_llama

MESSAGES = [{"role": "system", "content": DEMO_DEFAULTS["system_prompt"]}, {"role": "user", "content": "Hi"}]


def run(quick: bool = False) -> dict[str, Any]:
    import llama_cpp  # noqa: F401  imported once here, so the direct figure never counts it (the engine always does)

    rounds = 1 if quick else 5
    demo = str(demo_model())
    models_dir = Path(tempfile.mkdtemp(prefix="vcb-models-"))
    write_tiny_llama(models_dir / "tiny.gguf")
    through: list[dict[str, float]] = []
    direct: list[dict[str, float]] = []

    async def measure(runtime_dir: Path) -> None:
        async with Client(runtime_dir, timeout=120) as client:
            await wait_ready(client)
            await client.subscribe()
            events = client.raw_events()
            for _ in range(rounds):
                await client.request("load", {"model": "tiny.gguf"}, timeout=120)
                started = time.perf_counter()
                reply = await client.request("load", {"model": demo}, timeout=120)
                loaded = time.perf_counter()
                result = await chat_and_collect(client, events, 1, content="Hi")
                first = result["received"][0]
                through.append(
                    {
                        "total": first - started,
                        "load_reply": loaded - started,
                        "llama_init": reply["model"]["load_seconds"],
                        "first_token": first - result["started"],
                    }
                )
                started = time.perf_counter()
                model = DirectModel(demo)
                out = model.generate(MESSAGES, 1)
                direct.append({"total": out["produced"][0] - started, "llama_init": model.load_seconds})
                del model

    try:
        with daemon("--model", demo, "--models-dir", str(models_dir)) as d:
            asyncio.run(measure(d.runtime_dir))
    finally:
        for path in models_dir.iterdir():
            path.unlink()
        models_dir.rmdir()
    total = median([r["total"] for r in through])
    return {
        "name": "model switch",
        "settings": {
            "model": demo_model().name,
            "from": "a tiny random GGUF",
            "rounds": rounds,
            "n_threads": CPUS,
            "n_ctx": 4096,
        },
        "daemon_load_to_first_token_ms": 1000 * total,
        "direct_llama_to_first_token_ms": 1000 * median([r["total"] for r in direct]),
        "daemon_engine_llama_init_ms": 1000 * median([r["llama_init"] for r in through]),
        "direct_llama_init_ms": 1000 * median([r["llama_init"] for r in direct]),
        "daemon_process_swap_ms": 1000 * median([r["load_reply"] - r["llama_init"] for r in through]),
        "daemon_first_token_after_load_ms": 1000 * median([r["first_token"] for r in through]),
        "load_average_after": loadavg(),
        "targets": [],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
