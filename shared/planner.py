"""Where each byte of a model will live, predicted before it loads. docs/planner.md explains
each term and where it comes from in llama.cpp.

For `n_gpu_layers` = g on a model of L repeating layers, llama.cpp (llama-model.cpp,
`i_gpu_start = n_layer + 1 - n_gpu_layers`) offloads the output layer first, then the last g-1
repeating layers. The token embedding always stays on the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vramchat.shared import speed
from vramchat.shared.gguf import GGUFInfo, TensorInfo
from vramchat.shared.units import format_bytes

MIB = 1 << 20
# Bytes per element of each KV cache type (ggml blocks: q8_0 is 34 bytes per 32, q4_0 18 per 32).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# A CUDA context and cuBLAS workspace take memory that llama.cpp does not log; NVML sees it.
GPU_OVERHEAD_BYTES = 512 * MIB
DEFAULT_VRAM_MARGIN = 1 << 30


class PlanError(ValueError):
    pass


@functools.cache
def cpu_repack_types() -> frozenset[str]:
    """Weight types ggml's CPU backend repacks into its CPU_REPACK buffer on this CPU.

    ggml-cpu/repack.cpp (ggml_repack_get_optimal_repack_type): with AVX2, Q4_0, Q4_K and IQ4_NL
    matrices whose row count is a multiple of 8 are copied out of the mmapped file into an
    interleaved layout. The bytes stay the same; they move from page cache to anonymous memory.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset({"Q4_0", "Q4_K", "IQ4_NL"}) if " avx2" in flags else frozenset()


@dataclass(frozen=True)
class PlanSettings:
    """The load settings the prediction depends on; defaults are llama-cpp-python 0.3.36's."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = False  # Llama(flash_attn=False) disables it outright (llama.cpp's own default is auto)
    n_seq: int = 1
    # llama.cpp's default (llama_context_default_params): sliding-window layers get a full-size
    # cache too. Off, they keep only the window, as llama-server's --swa-full=false does.
    swa_full: bool = True
    # A GPU build on a machine with a GPU: the CUDA context and a compute buffer live in VRAM even
    # at n_gpu_layers = 0, because llama.cpp runs large prompt batches' matrix products there.
    has_gpu: bool = False
    cpu_repack: frozenset[str] = field(default_factory=cpu_repack_types)

    def check(self) -> None:
        for name in (self.cache_type_k, self.cache_type_v):
            if name not in KV_TYPE_BYTES:
                raise PlanError(f"unknown KV cache type {name!r}; use one of {', '.join(KV_TYPE_BYTES)}")
        if self.cache_type_v not in ("f32", "f16", "bf16") and not self.flash_attn:
            raise PlanError(
                f"a quantized V cache ({self.cache_type_v}) needs flash attention, and llama.cpp refuses to load "
                "without it: add --flash-attn, or keep V at f16"
            )
        if self.n_ctx < 1 or self.n_batch < 1 or self.n_ubatch < 1 or self.n_seq < 1:
            raise PlanError("n_ctx, n_batch, n_ubatch and n_seq must be at least 1")


@dataclass
class Side:
    """The bytes one device holds, term by term."""

    weights: int = 0
    kv: int = 0
    compute: int = 0
    output: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output + self.overhead


@dataclass
class Prediction:
    n_gpu_layers: int
    n_layer: int
    n_ctx: int  # as llama.cpp will size it (padded to 256)
    gpu: Side
    cpu: Side
    layers_on_gpu: int  # repeating layers
    output_on_gpu: bool
    # Weight bytes each generated token reads on each side (MoE: only the experts it uses).
    gpu_bytes_per_token: int = 0
    cpu_bytes_per_token: int = 0
    tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu"]["total"], data["cpu"]["total"] = self.gpu.total, self.cpu.total
        return data


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def predict(info: GGUFInfo, n_gpu_layers: int, settings: PlanSettings = PlanSettings()) -> Prediction:
    settings.check()
    for name, dim in ((settings.cache_type_k, info.head_dim_k), (settings.cache_type_v, info.head_dim_v)):
        if name in ("q8_0", "q4_0") and dim % 32:
            raise PlanError(f"a {name} KV cache needs a head size that divides by 32, and this model's is {dim}: keep f16")
    L = info.n_layer
    if not 0 <= n_gpu_layers <= L + 1:
        raise PlanError(
            f"n_gpu_layers must be between 0 and {L + 1} for this model ({L} layers + the output layer), not {n_gpu_layers}"
        )
    first_gpu_layer = L + 1 - n_gpu_layers  # llama.cpp's i_gpu_start
    on_gpu = [i >= first_gpu_layer for i in range(L)]
    output_on_gpu = n_gpu_layers >= 1
    gpu, cpu = Side(), Side()

    # Weights. The CPU side is mmapped: llama.cpp maps the span of the file from its first to
    # its last CPU tensor, and that span is its CPU_Mapped buffer. Tensors the CPU backend
    # repacks are copied out of the map into a CPU_REPACK buffer instead.
    mapped: list[TensorInfo] = []
    for tensor in info.tensors:
        is_output = tensor.name.startswith(("output.", "output_norm."))
        if (tensor.layer is not None and tensor.layer < L and on_gpu[tensor.layer]) or (is_output and output_on_gpu):
            gpu.weights += tensor.bytes
        elif _repacked(tensor, settings.cpu_repack):
            cpu.weights += tensor.bytes
        else:
            mapped.append(tensor)
    if info.tied_embeddings and output_on_gpu:
        gpu.weights += info.embedding_bytes  # the output reuses token_embd: llama.cpp copies it to the GPU
    if mapped:
        cpu.weights += max(t.offset + t.bytes for t in mapped) - min(t.offset for t in mapped)

    # KV cache: each layer's K and V for every cell, on the device of its layer.
    n_ctx = _pad(settings.n_ctx, 256)  # llama-context.cpp pads n_ctx to 256
    # llama-cpp-python clamps n_batch to the n_ctx asked for, before llama.cpp pads n_ctx.
    n_ubatch = min(settings.n_ubatch, settings.n_batch, settings.n_ctx)
    # llama-kv-cache-iswa.cpp: a sliding-window layer keeps n_swa * n_seq + n_ubatch cells.
    swa_cells = n_ctx if settings.swa_full else min(n_ctx, _pad((info.sliding_window or 0) * settings.n_seq + n_ubatch, 256))
    swa = set(info.swa_layers)
    bytes_k, bytes_v = KV_TYPE_BYTES[settings.cache_type_k], KV_TYPE_BYTES[settings.cache_type_v]
    for layer in range(L):
        cells = swa_cells if layer in swa else n_ctx
        per_cell = info.n_head_kv[layer] * (info.head_dim_k * bytes_k + info.head_dim_v * bytes_v)
        (gpu if on_gpu[layer] else cpu).kv += int(cells * per_cell)

    # Compute buffers: the peak of the graph's live tensors, which is either the attention step
    # (scores per head per cell per batch token, plus the mask, plus the FFN activations) or the
    # output step (logits for every batch token). Fitted to llama.cpp's own figures; see
    # docs/planner.md for the measured error.
    masks = 2 if info.swa_layers else 1  # sliding-window models build a second mask
    mask = masks * n_ctx * n_ubatch * (2 if settings.flash_attn else 4)  # f16 with flash attention
    # Without flash attention the scores are materialised; with it, only its f32 output.
    if settings.flash_attn:
        attention = mask + max(info.n_head) * info.head_dim_v * n_ubatch * 4
    else:
        attention = mask + max(info.n_head) * n_ctx * n_ubatch * 4
    n_ff = info.n_ff_expert or info.n_ff or 4 * info.n_embd
    live_embd = 2 if settings.flash_attn else 1

    def ffn(width: int) -> int:  # gate, up and their product, plus the layer's input
        return n_ubatch * (3 * width + live_embd * info.n_embd) * 4

    # A mixture-of-experts layer holds the activations of every expert a token uses, at a point
    # where the attention scores are already freed.
    moe_step = mask + ffn(n_ff * info.n_expert_used) if info.n_expert else 0
    logits = n_ubatch * (info.n_vocab + 3 * info.n_embd) * 4
    compute = max(attention + ffn(n_ff), moe_step, logits)
    if n_gpu_layers > 0 or settings.has_gpu:
        gpu.compute = compute
        gpu.overhead = GPU_OVERHEAD_BYTES
        # Not yet measured: the attention of layers left on the CPU runs there, next to their KV
        # cache, so count its step in host memory; otherwise only the staged inputs.
        staging = n_ubatch * info.n_embd * 4 * 4
        cpu.compute = attention + ffn(n_ff) if not all(on_gpu) else staging
    else:
        cpu.compute = compute
    cpu.output = info.n_vocab * 4 * settings.n_seq  # the logits kept for sampling

    gpu_read, cpu_read = speed.bytes_read_per_token(info, on_gpu, output_on_gpu)
    return Prediction(
        n_gpu_layers=n_gpu_layers,
        n_layer=L,
        n_ctx=n_ctx,
        gpu=gpu,
        cpu=cpu,
        layers_on_gpu=sum(on_gpu),
        output_on_gpu=output_on_gpu,
        gpu_bytes_per_token=gpu_read,
        cpu_bytes_per_token=cpu_read,
    )


def _repacked(tensor: TensorInfo, types: frozenset[str]) -> bool:
    """Whether ggml-cpu copies this CPU tensor into its CPU_REPACK buffer (matrix products only)."""
    return (
        tensor.type in types
        and tensor.name != "token_embd.weight"  # a row lookup, not a product
        and len(tensor.shape) >= 2
        and tensor.shape[1] % 8 == 0
    )


def plan_table(
    info: GGUFInfo,
    settings: PlanSettings = PlanSettings(),
    *,
    ram_bandwidth: float | None = None,
    gpu_bandwidth: float | None = None,
) -> list[Prediction]:
    table = [predict(info, g, settings) for g in range(info.n_layer + 2)]
    if ram_bandwidth:
        for row in table:
            row.tokens_per_s = speed.estimate_tokens_per_second(row, ram_bandwidth, gpu_bandwidth or speed.DEFAULT_GPU_BANDWIDTH)
    return table


@dataclass
class Fit:
    n_gpu_layers: int
    n_ctx: int
    budget: int
    prediction: Prediction
    fits_all: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prediction": self.prediction.to_dict()}


def fit(info: GGUFInfo, vram_budget: int, settings: PlanSettings = PlanSettings(), *, fit_ctx: bool = False) -> Fit:
    """The most GPU layers whose predicted VRAM is within `vram_budget` (0 if none fits).

    With `fit_ctx`, first the largest n_ctx (up to the trained context, in steps of 256) at which
    every layer fits, if any does; otherwise the layers are fitted at settings.n_ctx.
    """
    if fit_ctx:
        best_ctx = None
        for n_ctx in range(256, max(info.n_ctx_train, 256) + 1, 256):
            if predict(info, info.n_layer + 1, replace(settings, n_ctx=n_ctx)).gpu.total <= vram_budget:
                best_ctx = n_ctx
            else:
                break
        if best_ctx is not None:
            settings = replace(settings, n_ctx=best_ctx)
    best = predict(info, 0, settings)
    for layers in range(1, info.n_layer + 2):
        candidate = predict(info, layers, settings)
        if candidate.gpu.total > vram_budget:
            break
        best = candidate
    return Fit(best.n_gpu_layers, best.n_ctx, vram_budget, best, best.n_gpu_layers == info.n_layer + 1)


@dataclass(frozen=True)
class Machine:
    """The daemon's machine as a reload would find it: the engine being replaced gives its VRAM
    and its anonymous RAM back before the new one loads."""

    free_vram: int = 0
    available_ram: int = 0
    gpu_name: str | None = None
    # Bytes/s; None: measure this machine's (speed.ram_bandwidth, cached after the first time).
    ram_bandwidth: float | None = None

    @property
    def has_gpu(self) -> bool:
        """A device to offload to: a GPU found, or VRAM given for a machine planned from afar."""
        return self.gpu_name is not None or self.free_vram > 0

    @classmethod
    def from_sample(cls, sample: dict[str, Any] | None) -> Machine:
        """From a telemetry sample (daemon/telemetry.py); an empty machine before the first one."""
        if sample is None:
            return cls()
        gpus = sample["gpus"]
        vram = sum((g.get("memory_free") or 0) + (g.get("engine_memory") or 0) for g in gpus)
        ram = (sample["host"].get("ram_available") or 0) + ((sample.get("engine") or {}).get("anon_resident") or 0)
        return cls(vram, ram, (gpus[0].get("name") or "unknown GPU") if gpus else None)


@dataclass
class SwapVerdict:
    would_swap: bool
    needed: int
    available: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def swap_check(prediction: Prediction, available_ram: int) -> SwapVerdict:
    """Will the CPU side (mmapped weights, their KV and compute buffers) fit in available RAM?"""
    needed = prediction.cpu.total
    if needed <= available_ram:
        return SwapVerdict(False, needed, available_ram, "fits in RAM")
    short = needed - available_ram
    ways = [
        f"lower the context: n_ctx {prediction.n_ctx} costs {format_bytes(prediction.cpu.kv)} of KV cache in RAM",
        "pick a smaller quantization of this model",
    ]
    if prediction.n_gpu_layers <= prediction.n_layer:
        ways.insert(0, "put more layers on the GPU (--gpu-layers, or auto)")
    return SwapVerdict(
        True,
        needed,
        available_ram,
        f"this load needs {format_bytes(needed)} of RAM on the CPU side but only "
        f"{format_bytes(available_ram)} is available ({format_bytes(short)} short): the system would swap "
        f"and every token would wait on the disk. Ways out: {'; '.join(ways)}. Use --force to load anyway.",
    )


@dataclass
class LoadPlan:
    """Everything decided about a load before it happens: the daemon, the load dialog and
    `vramchat plan` all build it with `plan_load`, so they cannot disagree."""

    info: GGUFInfo
    settings: PlanSettings
    machine: Machine
    budget: int  # VRAM the layers may fill
    fitted: Fit  # the most layers within the budget
    prediction: Prediction  # for the chosen layer count, with its tokens_per_s
    swap: SwapVerdict
    ram_bandwidth: float
    gpu_bandwidth: float

    @property
    def n_gpu_layers(self) -> int:
        return self.prediction.n_gpu_layers

    def table(self) -> list[Prediction]:
        """The prediction for every layer count 0..n_layer+1, at this plan's settings."""
        return plan_table(self.info, self.settings, ram_bandwidth=self.ram_bandwidth, gpu_bandwidth=self.gpu_bandwidth)

    def to_dict(self) -> dict[str, Any]:
        """The `plan` a `model` event carries (docs/protocol.md)."""
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "vram_budget": self.budget,
            "prediction": self.prediction.to_dict(),
            "swap": self.swap.to_dict(),
        }


def plan_load(
    info: GGUFInfo,
    machine: Machine,
    n_gpu_layers: int | Literal["auto"],
    settings: PlanSettings,
    *,
    vram_budget: int | None = None,
    fit_ctx: bool = False,
) -> LoadPlan:
    """Plan a load of `info` on `machine`: resolve "auto" against the VRAM budget (by default the
    free VRAM less a margin), predict every term, estimate the speed and judge the swap risk.

    With `fit_ctx`, n_ctx is first raised to the largest at which every layer fits (see `fit`).
    Raises PlanError with a message a person can act on for settings the model cannot take.
    """
    settings = replace(settings, has_gpu=settings.has_gpu or machine.has_gpu)
    budget = max(0, machine.free_vram - DEFAULT_VRAM_MARGIN) if vram_budget is None else vram_budget
    if budget < 0:
        raise PlanError(f"the VRAM budget must not be negative, not {budget}")
    fitted = fit(info, budget, settings, fit_ctx=fit_ctx)
    if fit_ctx:
        settings = replace(settings, n_ctx=fitted.n_ctx)
    if n_gpu_layers != "auto" and not 0 <= n_gpu_layers <= info.n_layer + 1:
        raise PlanError(
            f"n_gpu_layers {n_gpu_layers} is outside what this model has: {info.n_layer} layers + the output layer; "
            f'choose 0..{info.n_layer + 1}, or "auto" to fit the VRAM budget'
        )
    layers = fitted.n_gpu_layers if n_gpu_layers == "auto" else n_gpu_layers
    prediction = fitted.prediction if layers == fitted.n_gpu_layers else predict(info, layers, settings)
    ram_bw = machine.ram_bandwidth or speed.ram_bandwidth()
    gpu_bw = speed.gpu_bandwidth_for(machine.gpu_name)
    prediction.tokens_per_s = speed.estimate_tokens_per_second(prediction, ram_bw, gpu_bw)
    return LoadPlan(
        info, settings, machine, budget, fitted, prediction, swap_check(prediction, machine.available_ram), ram_bw, gpu_bw
    )
