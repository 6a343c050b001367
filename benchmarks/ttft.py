"""Time to first token through the daemon against the engine's loop in-process, demo model.

Daemon: from sending `chat` to the client receiving the first `tok` (so it includes the request,
storing the user message, the queue, formatting in the daemon, the engine's prompt evaluation
and the relay back). Direct: from formatting the same messages to the first token's text.
Each round uses a new user message (a numbered request), sent to both, so both evaluate the same
new prompt suffix against the same cached prefix; each goes first in half the rounds. Target: the
median of the rounds' differences within 5 ms.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from benchmarks.common import CPUS, PROMPT, DirectModel, chat_and_collect, daemon, demo_model, loadavg, median, target, wait_ready
from vramchat.daemon.model_files import DEMO_DEFAULTS
from vramchat.shared import protocol
from vramchat.shared.client import Client

# A user types before sending: the daemon and the engine have been idle. How much that costs
# on this machine is measured with a request that does no work, after this long idle.
IDLE_S = 0.3


async def round_trip(client: Client) -> float:
    """Seconds for one `hello`: the request path with no work behind it."""
    started = time.perf_counter()
    await client.request("hello", {"protocol": protocol.PROTOCOL_VERSION})
    return time.perf_counter() - started


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 15
    model = str(demo_model())
    direct_model = DirectModel(model)
    direct: list[float] = []
    through: list[float] = []
    engine_ttft: list[float] = []
    first_relay: list[float] = []  # the engine's stamp of the first token to its receipt
    prompt_tokens: list[tuple[int, int]] = []
    hot: list[float] = []
    cold: list[float] = []

    async def measure(runtime_dir: Any) -> None:
        async with Client(runtime_dir, timeout=120) as client:
            await wait_ready(client)
            await client.subscribe()
            events = client.raw_events()
            await chat_and_collect(client, events, 2, content="Hello")
            direct_model.generate(
                [{"role": "system", "content": DEMO_DEFAULTS["system_prompt"]}, {"role": "user", "content": "Hello"}], 2
            )
            for _ in range(rounds):
                hot.append(await round_trip(client))
                await asyncio.sleep(IDLE_S)
                cold.append(await round_trip(client))
            for i in range(rounds):
                content = f"Request {i}. {PROMPT}"
                messages = [{"role": "system", "content": DEMO_DEFAULTS["system_prompt"]}, {"role": "user", "content": content}]
                if i % 2:  # each goes first in half the rounds
                    result = await chat_and_collect(client, events, 2, content=content)
                first = direct_model.generate(messages, 2)
                if not i % 2:
                    result = await chat_and_collect(client, events, 2, content=content)
                direct.append(first["produced"][0] - first["started"])
                through.append(result["received"][0] - result["started"])
                engine_ttft.append(result["stats"]["ttft_s"])
                first_relay.append(result["latencies"][0])
                prompt_tokens.append((first["prompt_tokens"], result["stats"]["prompt_tokens"]))

    with daemon("--model", model) as d:
        asyncio.run(measure(d.runtime_dir))
    # Paired: the prompt evaluation's speed drifts by more than the target between rounds.
    delta_ms = 1000 * median([t - d for t, d in zip(through, direct, strict=True)])
    outside_engine_ms = 1000 * (median(through) - median(engine_ttft))
    relay_ms = 1000 * median(first_relay)
    return {
        "name": "time to first token",
        "settings": {
            "model": demo_model().name,
            "rounds": rounds,
            "n_threads": CPUS,
            "n_ctx": 4096,
            "prompt": "system prompt + a new ~20-token user message each round, the rest cached in both",
        },
        "direct_ttft_ms": 1000 * median(direct),
        "daemon_ttft_ms": 1000 * median(through),
        "delta_ms": delta_ms,
        "engine_own_ttft_ms": 1000 * median(engine_ttft),
        "daemon_outside_engine_ms": outside_engine_ms,
        "first_token_relay_ms": relay_ms,
        "request_round_trip_back_to_back_ms": 1000 * median(hot),
        "request_round_trip_after_idle_ms": 1000 * median(cold),
        "same_prompt_tokens": all(a == b for a, b in prompt_tokens),
        "prompt_tokens": prompt_tokens[0][1],
        "load_average_after": loadavg(),
        "targets": [
            target(
                "delta_ms",
                "<= 5 ms",
                abs(delta_ms) <= 5,
                f"the engine's own TTFT was {1000 * median(engine_ttft):.1f} ms against {1000 * median(direct):.1f} ms "
                f"direct; the rest ({outside_engine_ms:.1f} ms) is the request, the store and the queue, and the "
                f"first token's relay ({relay_ms:.1f} ms median), which waits for a core while the engine's llama "
                f"threads compute the next token on all of them. A `hello` request, which does no work, takes "
                f"{1000 * median(cold):.1f} ms after {IDLE_S} s idle against {1000 * median(hot):.1f} ms back to back",
            )
        ],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
