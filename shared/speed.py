"""How fast a placement generates: memory bandwidth of the GPU and of this machine's RAM, and the
CPU's matrix throughput.

Each generated token reads its weights once, so the bytes it reads on each side over that side's
bandwidth bound the speed from above (the prediction's `*_bytes_per_token`, see planner.py). On
the CPU, ggml's quantized matrix-vector products also take compute time, and every token pays a
fixed cost per layer and per vocabulary entry; with those (`cpu=` of estimate_tokens_per_second)
the estimate is the expected speed. docs/planner.md gives the formula and its measured error.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

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

# ggml's CPU matrix-vector product per weight of each type, in float32 FLOPs of a BLAS SGEMM on the
# same core (so it follows the core's SIMD speed). Calibrated with llama.cpp 0.3.36's kernels on
# an AVX-512 EPYC core (97 GFLOP/s SGEMM), one thread, on random-weight models of 274M weights
# (tests/gguf_factory.py write_random_llama), memory time taken out: Q4_0 and Q4_K run repacked.
WORK_PER_WEIGHT = {"Q4_0": 2.6, "Q4_K": 2.75, "Q6_K": 3.5, "Q4_1": 4.7, "F16": 5.1, "Q8_0": 5.4}
DEFAULT_WORK_PER_WEIGHT = 4.5  # the types not measured (F32, BF16, Q5_*, Q2_K, Q3_K, Q5_K, IQ*)
WORK_PER_ROW = 1230.0  # each output row's dot product: setup and horizontal sum (12.7 ns at 97 GFLOP/s)
# Per-token costs that no weight accounts for, in seconds, measured on the same machine with tiny
# models: llama_decode's graph building and scheduling per layer, and sampling over the logits.
TOKEN_S = 15e-6
LAYER_S = 27e-6
VOCAB_S = 2e-9
SYNC_S = 80e-6  # per CPU layer and per thread beyond the first: the threads meet after every op
DEFAULT_FLOPS_PER_THREAD = 5e10  # when the measurement cannot run
MATMUL_PROBE = """
import time, numpy
a = numpy.ones((512, 512), dtype=numpy.float32)
a @ a
best = float("inf")
for _ in range(20):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
print(2 * 512 ** 3 / best)
"""


@dataclass(frozen=True)
class CpuSpeed:
    """One thread's float32 matrix product rate and the cores to run threads on."""

    flops_per_thread: float
    cores: int


def bytes_read_per_token(info: GGUFInfo, on_gpu: list[bool], output_on_gpu: bool, cpu_expert_layers: int = 0) -> tuple[int, int]:
    """Weight bytes one generated token streams from VRAM and from RAM.

    Every layer is read whole, except that a mixture-of-experts layer reads only n_expert_used
    of its n_expert experts, in RAM for the first `cpu_expert_layers` layers (--n-cpu-moe). The
    token embedding is one row, so it does not count; the output matrix (token_embd again when
    the embeddings are tied) is read whole.
    """
    expert_share = info.n_expert_used / info.n_expert if info.n_expert else 1.0
    gpu = cpu = 0
    for layer in range(info.n_layer):
        experts = int(info.layer_expert_bytes[layer] * expert_share)
        rest = info.layer_bytes[layer] - info.layer_expert_bytes[layer]
        if not on_gpu[layer]:
            cpu += rest + experts
        elif layer < cpu_expert_layers:
            gpu, cpu = gpu + rest, cpu + experts
        else:
            gpu += rest + experts
    output = info.output_bytes + (info.embedding_bytes if info.tied_embeddings else 0)
    if output_on_gpu:
        gpu += output
    else:
        cpu += output
    return gpu, cpu


def cpu_work_per_token(info: GGUFInfo, on_gpu: list[bool], output_on_gpu: bool, cpu_expert_layers: int = 0) -> float:
    """FLOP-equivalents (WORK_PER_WEIGHT, WORK_PER_ROW) of the matrix products one token runs on the CPU.

    The same matrices as bytes_read_per_token: the CPU's layers (MoE: n_expert_used of n_expert),
    the experts kept in RAM, and the output matrix when it stays on the CPU; the token embedding
    is a row lookup.
    """
    expert_share = info.n_expert_used / info.n_expert if info.n_expert else 1.0
    output = "token_embd.weight" if info.tied_embeddings else "output.weight"
    work = 0.0
    for tensor in info.tensors:
        if len(tensor.shape) < 2:
            continue
        if tensor.layer is not None and tensor.layer < info.n_layer:
            if on_gpu[tensor.layer] and not (tensor.expert and tensor.layer < cpu_expert_layers):
                continue
        elif tensor.name != output or output_on_gpu:
            continue
        rows = math.prod(tensor.shape[1:]) * (expert_share if tensor.expert else 1.0)
        work += rows * (tensor.shape[0] * WORK_PER_WEIGHT.get(tensor.type, DEFAULT_WORK_PER_WEIGHT) + WORK_PER_ROW)
    return work


def estimate_tokens_per_second(
    prediction: Prediction,
    ram_bandwidth: float,
    gpu_bandwidth: float,
    *,
    info: GGUFInfo | None = None,
    cpu: CpuSpeed | None = None,
    n_threads: int | None = None,
) -> float:
    """Expected tok/s of `prediction` for the model `info`, with `n_threads` (default: every core).

    Without `info` and `cpu` it is the bandwidth bound alone (each token reads its weights once:
    the CPU side at RAM speed, the GPU side at VRAM speed), which overestimates small models.
    With them, per token:

        t = hypot(CPU work / (flops_per_thread x threads), CPU bytes / RAM bandwidth)
            + GPU bytes / VRAM bandwidth + TOKEN_S + LAYER_S x n_layer + VOCAB_S x n_vocab
            + SYNC_S x CPU layers x (threads - 1)

    The CPU's compute and memory time overlap only in part, which the hypot (rather than a sum
    or a max) fits within 10% on the measured models. Left out: the KV cache reads, which grow
    with the context, and the PCIe transfer between the two halves.
    """
    memory = prediction.cpu_bytes_per_token / ram_bandwidth
    gpu = prediction.gpu_bytes_per_token / gpu_bandwidth
    if info is None or cpu is None:
        seconds = memory + gpu
        return 1 / seconds if seconds > 0 else 0.0
    threads = max(1, n_threads or cpu.cores)
    first_gpu_layer = prediction.n_layer - prediction.layers_on_gpu
    on_gpu = [layer >= first_gpu_layer for layer in range(prediction.n_layer)]
    experts = prediction.cpu_expert_layers
    work = cpu_work_per_token(info, on_gpu, prediction.output_on_gpu, experts)
    compute = work / (cpu.flops_per_thread * min(threads, cpu.cores))
    cpu_layers = max(first_gpu_layer, min(experts, prediction.n_layer))  # layers with work in RAM
    fixed = TOKEN_S + LAYER_S * prediction.n_layer + VOCAB_S * info.n_vocab + SYNC_S * cpu_layers * (threads - 1)
    return 1 / (math.hypot(compute, memory) + gpu + fixed)


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


def cpu_speed(refresh: bool = False) -> CpuSpeed:
    """One thread's SGEMM rate on this machine, measured once (~0.3 s) and cached next to the RAM bandwidth.

    In a child process: OpenBLAS takes its thread count from the environment when numpy loads,
    and this process may have loaded it already.
    """
    cache = paths.cache_dir() / "cpu_speed.json"
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if not refresh:
        try:
            return CpuSpeed(float(json.loads(cache.read_text())["flops_per_thread"]), cores)
        except (OSError, ValueError, KeyError):
            pass
    one_thread = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        probe = subprocess.run(
            [sys.executable, "-c", MATMUL_PROBE], env=one_thread, capture_output=True, text=True, timeout=60, check=True
        )
        measured = float(probe.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return CpuSpeed(DEFAULT_FLOPS_PER_THREAD, cores)  # not cached: the next call tries again
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"flops_per_thread": measured, "measured_at": time.time(), "cpus": os.cpu_count()}))
    return CpuSpeed(measured, cores)
