"""Offloading to an RPC device: tok/s of the demo model at each n_gpu_layers, with the layers on a
`vramchat rpc-server` on loopback that serves this machine's own CPU.

The RPC device here is the same CPU the engine runs on, so these figures measure what llama.cpp's
RPC transport costs (the activations of every token cross a TCP connection, there and back, for
each run of layers on the device), never GPU speed: a real GPU behind the server computes its
layers many times faster, and a real network adds its round trip per token on top of loopback's.
All layers on the RPC device run at about the CPU's speed (one process computes, the other
waits); a split costs more, since each token's activations cross between the two processes and
llama.cpp sends the device its graph for every token. No target: the figures are for reading.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CPUS, chat_and_collect, daemon, demo_model, loadavg, median, rate
from vramchat.shared.client import Client
from vramchat.shared.rpc_endpoints import unreachable

N_CTX = 2048


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(endpoint: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "vramchat.tui.cli", "rpc-server", "--listen", endpoint, "--device", "CPU",
             "--threads", str(CPUS)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while unreachable(endpoint, timeout=0.5) is not None:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vramchat rpc-server did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return server


async def measure(runtime_dir: Path, layer_counts: list[int], rounds: int, max_tokens: int) -> dict[int, dict[str, Any]]:
    model = str(demo_model())
    results: dict[int, dict[str, Any]] = {}
    async with Client(runtime_dir, timeout=300) as client:
        await client.subscribe()
        events = client.raw_events()
        for layers in layer_counts:
            loaded = (await client.request("load", {"model": model, "n_gpu_layers": layers, "n_ctx": N_CTX}, timeout=300))[
                "model"
            ]
            on_rpc = sum(b["bytes"] for b in (loaded["split"] or {}).get("buffers", []) if b["device"].startswith("RPC0"))
            await chat_and_collect(client, events, 8)  # warm up
            runs = [await chat_and_collect(client, events, max_tokens) for _ in range(rounds)]
            results[layers] = {"tok_s": median([rate(r["received"]) for r in runs]), "rpc_bytes": on_rpc}
    return results


def run(quick: bool = False) -> dict[str, Any]:
    demo = demo_model()
    layer_counts, rounds, max_tokens = ([0, 16, 31], 1, 24) if quick else ([0, 8, 16, 24, 31], 3, 100)
    root = Path(tempfile.mkdtemp(prefix="vcb-rpc-"))
    endpoint = f"127.0.0.1:{free_port()}"
    server = start_server(endpoint, root / "rpc-server.log")
    try:
        with daemon("--no-load", "--rpc", endpoint, "--threads", str(CPUS)) as d:
            results = asyncio.run(measure(d.runtime_dir, layer_counts, rounds, max_tokens))
    finally:
        server.terminate()
        server.wait(30)
    cpu, all_layers = results[layer_counts[0]]["tok_s"], results[layer_counts[-1]]["tok_s"]
    figures: dict[str, Any] = {f"tok_s_at_{n}_layers": r["tok_s"] for n, r in results.items()}
    figures |= {f"rpc_mib_at_{n}_layers": r["rpc_bytes"] / (1 << 20) for n, r in results.items()}
    return {
        "name": "RPC offload on loopback: tok/s per n_gpu_layers",
        "settings": {
            "model": demo.name,
            "n_ctx": N_CTX,
            "rounds": rounds,
            "max_tokens": max_tokens,
            "threads": CPUS,
            "server": "vramchat rpc-server --device CPU on 127.0.0.1",
            "loadavg": loadavg(),
        },
        **figures,
        "all_layers_vs_cpu": all_layers / cpu,
        # The dearest split: what a token pays for crossing to the device and back, over the CPU's time.
        "worst_split_ms_per_token_over_cpu": max(1000 / results[n]["tok_s"] - 1000 / cpu for n in layer_counts[1:-1]),
    }
