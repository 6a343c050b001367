"""How fast a placement can generate: memory bandwidth of the GPU and of this machine's RAM.

Each generated token reads its weights once, so the bytes it reads on each side over that side's
bandwidth bound the speed from above (the prediction's `*_bytes_per_token`, see planner.py).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from vramchat.shared import paths
from vramchat.shared.gguf import GGUFInfo

if TYPE_CHECKING:
    from vramchat.shared.planner import Prediction

MIB = 1 << 20

# Memory bandwidth of common GPUs in bytes/s, for the speed estimate (vendor specifications).
GPU_BANDWIDTH = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    "L40S": 8.64e11,
    "A6000": 7.68e11,
    "RTX 6000 Ada": 9.6e11,
    "4090": 1.008e12,
    "4080": 7.17e11,
    "4070 Ti": 5.04e11,
    "4070": 5.04e11,
    "4060 Ti": 2.88e11,
    "4060": 2.72e11,
    "3090": 9.36e11,
    "3080": 7.6e11,
    "3070": 4.48e11,
    "3060": 3.6e11,
    "T4": 3.2e11,
    "V100": 9.0e11,
}
DEFAULT_GPU_BANDWIDTH = 4.0e11


def bytes_read_per_token(info: GGUFInfo, on_gpu: list[bool], output_on_gpu: bool) -> tuple[int, int]:
    """Weight bytes one generated token streams from VRAM and from RAM.

    Every layer is read whole, except that a mixture-of-experts layer reads only n_expert_used
    of its n_expert experts. The token embedding is one row, so it does not count; the output
    matrix (token_embd again when the embeddings are tied) is read whole.
    """
    expert_share = info.n_expert_used / info.n_expert if info.n_expert else 1.0
    gpu = cpu = 0
    for layer in range(info.n_layer):
        read = info.layer_bytes[layer] - info.layer_expert_bytes[layer] * (1 - expert_share)
        if on_gpu[layer]:
            gpu += int(read)
        else:
            cpu += int(read)
    output = info.output_bytes + (info.embedding_bytes if info.tied_embeddings else 0)
    if output_on_gpu:
        gpu += output
    else:
        cpu += output
    return gpu, cpu


def estimate_tokens_per_second(prediction: Prediction, ram_bandwidth: float, gpu_bandwidth: float) -> float:
    """Each token reads its weights once: the CPU side at RAM speed, the GPU side at VRAM speed.

    An upper bound: it leaves out compute, the KV cache reads and the PCIe transfer between the
    two halves, which matter for small models and long contexts.
    """
    seconds = prediction.cpu_bytes_per_token / ram_bandwidth + prediction.gpu_bytes_per_token / gpu_bandwidth
    return 1 / seconds if seconds > 0 else 0.0


def gpu_bandwidth_for(name: str | None) -> float:
    if name:
        for key, bandwidth in sorted(GPU_BANDWIDTH.items(), key=lambda item: -len(item[0])):
            if key in name:
                return bandwidth
    return DEFAULT_GPU_BANDWIDTH


def ram_bandwidth(refresh: bool = False) -> float:
    """Bytes/s this machine's RAM reads at, measured once (~0.3 s) and cached."""
    cache = paths.cache_dir() / "ram_bandwidth.json"
    if not refresh:
        try:
            return float(json.loads(cache.read_text())["bytes_per_second"])
        except (OSError, ValueError, KeyError):
            pass
    import numpy

    data = numpy.ones(256 * MIB // 8)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()  # streams the array from RAM
        best = min(best, time.perf_counter() - started)
    measured = data.nbytes / best
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"bytes_per_second": measured, "measured_at": time.time(), "cpus": os.cpu_count()}))
    return measured
