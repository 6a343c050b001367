"""Where each byte of a model will live, predicted before it loads. docs/planner.md explains
each term and where it comes from in llama.cpp.

For `n_gpu_layers` = g on a model of L repeating layers, llama.cpp (llama-model.cpp,
`i_gpu_start = n_layer + 1 - n_gpu_layers`) offloads the output layer first, then the last g-1
repeating layers. The token embedding always stays on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vramchat.shared import placement, speed
from vramchat.shared.gguf import GGUFInfo, TensorInfo
from vramchat.shared.placement import OffloadDevice, SplitMode

MIB = 1 << 20
# Bytes per element of each KV cache type (ggml blocks: q8_0 is 34 bytes per 32, q4_0 18 per 32).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


FlashAttn = bool | Literal["auto"]


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
    # Llama(flash_attn=False) disables it outright (llama.cpp's own default is auto). "auto" lets
    # llama.cpp turn it on where every device supports it, which CPU, CUDA and RPC to them do: it
    # is planned as on.
    flash_attn: FlashAttn = False
    n_seq: int = 1
    # llama.cpp's default (llama_context_default_params): sliding-window layers get a full-size
    # cache too. Off, they keep only the window, as llama-server's --swa-full=false does.
    swa_full: bool = True
    # A GPU build on a machine with a GPU: the CUDA context and a compute buffer live in VRAM even
    # at n_gpu_layers = 0, because llama.cpp runs large prompt batches' matrix products there.
    has_gpu: bool = False
    cpu_repack: frozenset[str] = field(default_factory=cpu_repack_types)
    # How layers are shared among several offload devices (shared/placement.py): llama.cpp's
    # --split-mode, --main-gpu and --tensor-split (None: by each device's free memory).
    split_mode: SplitMode = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None
    n_threads: int | None = None  # for the speed estimate; None: one per core
    # The expert tensors (ffn_*_exps) of the first n_cpu_moe layers stay in host RAM whatever
    # their layer's device (llama.cpp's --n-cpu-moe; --cpu-moe is every layer). None: none, unless
    # the fit for n_gpu_layers "auto" finds that keeping some there is faster (load_plan.py).
    n_cpu_moe: int | None = None
    use_mmap: bool = True  # off: llama.cpp reads the weights into anonymous memory (--no-mmap)
    use_mlock: bool = False  # lock the weights in RAM (--mlock)

    def check(self) -> None:
        """Refuse what llama.cpp would refuse. A KV cache type may be "auto": plan_load chooses it."""
        for name in (self.cache_type_k, self.cache_type_v):
            if name not in KV_TYPE_BYTES and name != "auto":
                raise PlanError(f"unknown KV cache type {name!r}; use one of {', '.join(KV_TYPE_BYTES)}")
        if self.cache_type_v not in ("f32", "f16", "bf16", "auto") and not self.flash_attn:
            raise PlanError(
                f"a quantized V cache ({self.cache_type_v}) needs flash attention, and llama.cpp refuses to load "
                "without it: add --flash-attn on, or keep V at f16"
            )
        if self.n_ctx < 1 or self.n_batch < 1 or self.n_ubatch < 1 or self.n_seq < 1:
            raise PlanError("n_ctx, n_batch, n_ubatch and n_seq must be at least 1")
        if self.n_ubatch > self.n_batch:
            raise PlanError(
                f"n_ubatch {self.n_ubatch} is above n_batch {self.n_batch}: a micro-batch is part of a batch; "
                "lower --ubatch-size or raise --batch-size"
            )
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise PlanError(f"n_cpu_moe must be >= 0, not {self.n_cpu_moe}")


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

    def add(self, other: Side) -> None:
        for name in ("weights", "kv", "compute", "output", "overhead"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class RamTerms:
    """The CPU side as the kernel counts it. What must stay resident is the anonymous memory plus
    the mapped weights every token reads; the rest of the mapping (the token embedding's rows not
    looked up, tensors copied to a device or repacked) is page cache the kernel may drop."""

    anonymous: int = 0  # repacked weights, KV, compute and output buffers; every weight with --no-mmap
    mapped_read: int = 0  # mapped weights read on every token (all of the mapping with --mlock)
    mapped_cache: int = 0  # the rest of the mapping: clean page cache

    @property
    def resident(self) -> int:
        return self.anonymous + self.mapped_read


@dataclass
class DeviceShare:
    """What one offload device gets: its layers and its bytes."""

    device: OffloadDevice
    layers: int = 0  # repeating layers
    output: bool = False  # holds the output layer
    side: Side = field(default_factory=Side)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.device.name,
            "log_name": self.device.log_name,
            "kind": self.device.kind,
            "layers": self.layers,
            "output": self.output,
            **asdict(self.side),
            "total": self.side.total,
        }


@dataclass
class Prediction:
    n_gpu_layers: int
    n_layer: int
    n_ctx: int  # as llama.cpp will size it (padded to 256)
    gpu: Side  # every offload device together
    cpu: Side
    layers_on_gpu: int  # repeating layers
    output_on_gpu: bool
    cpu_expert_layers: int = 0  # the first layers whose experts stay in RAM (--n-cpu-moe)
    ram: RamTerms = field(default_factory=RamTerms)  # the CPU side's bytes as the kernel counts them
    devices: list[DeviceShare] = field(default_factory=list)  # each offload device, in llama.cpp's order
    # Weight bytes each generated token reads on each side (MoE: only the experts it uses).
    gpu_bytes_per_token: int = 0
    cpu_bytes_per_token: int = 0
    tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu"]["total"], data["cpu"]["total"] = self.gpu.total, self.cpu.total
        data["devices"] = [share.to_dict() for share in self.devices]
        return data


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


# Planned without a device list (`vramchat plan --vram`, or no GPU here): one CUDA GPU.
SOME_GPU = OffloadDevice("CUDA0", "CUDA")


def predict(
    info: GGUFInfo, n_gpu_layers: int, settings: PlanSettings = PlanSettings(), devices: Sequence[OffloadDevice] = ()
) -> Prediction:
    """Every term on every device for `n_gpu_layers`, with `devices` in llama.cpp's order (RPC
    devices, then local GPUs); without them, one CUDA GPU."""
    settings.check()
    if "auto" in (settings.cache_type_k, settings.cache_type_v):
        raise PlanError('a KV cache type of "auto" is chosen by plan_load, not predicted')
    for name, dim in ((settings.cache_type_k, info.head_dim_k), (settings.cache_type_v, info.head_dim_v)):
        if name in ("q8_0", "q4_0") and dim % 32:
            raise PlanError(f"a {name} KV cache needs a head size that divides by 32, and this model's is {dim}: keep f16")
    L = info.n_layer
    if not 0 <= n_gpu_layers <= L + 1:
        raise PlanError(
            f"n_gpu_layers must be between 0 and {L + 1} for this model ({L} layers + the output layer), not {n_gpu_layers}"
        )
    try:
        used = placement.used_devices(devices or [SOME_GPU], settings.split_mode, settings.main_gpu)
        placement.check_tensor_split(settings.tensor_split, used)
    except placement.PlacementError as exc:
        raise PlanError(str(exc)) from None
    where = placement.layer_devices(L, n_gpu_layers, placement.split_shares(used, settings.tensor_split))
    shares = [DeviceShare(device) for device in used]
    on_gpu = [where[i] is not None for i in range(L)]
    output_device = where[L]
    output_on_gpu = output_device is not None
    for layer_device in where[:L]:
        if layer_device is not None:
            shares[layer_device].layers += 1
    if output_device is not None:
        shares[output_device].output = True
    cpu = Side()

    def side_of_layer(layer: int | None) -> Side:
        index = where[L] if layer is None else where[layer]
        return cpu if index is None else shares[index].side

    # Weights. The CPU side is mmapped: llama.cpp maps the span of the file from its first to
    # its last CPU tensor, and that span is its CPU_Mapped buffer. Tensors the CPU backend
    # repacks are copied out of the map into a CPU_REPACK buffer instead.
    # With --n-cpu-moe N the expert tensors of layers 0..N-1 stay on the CPU, wherever their layer is.
    cpu_experts = min(settings.n_cpu_moe or 0, L) if info.n_expert else 0
    mapped: list[TensorInfo] = []
    repacked = 0
    for tensor in info.tensors:
        is_output = tensor.name.startswith(("output.", "output_norm."))
        in_ram = tensor.expert and tensor.layer is not None and tensor.layer < cpu_experts
        if tensor.layer is not None and tensor.layer < L and on_gpu[tensor.layer] and not in_ram:
            side_of_layer(tensor.layer).weights += tensor.bytes
        elif is_output and output_on_gpu:
            side_of_layer(None).weights += tensor.bytes
        elif _repacked(tensor, settings.cpu_repack):
            repacked += tensor.bytes
        else:
            mapped.append(tensor)
    if info.tied_embeddings and output_on_gpu:
        side_of_layer(None).weights += info.embedding_bytes  # the output reuses token_embd: llama.cpp copies it
    # A split model's files are mapped one by one (llama-model.cpp, get_mapping_range per file).
    span = sum(
        max(t.offset + t.bytes for t in mapped if t.shard == shard) - min(t.offset for t in mapped if t.shard == shard)
        for shard in {t.shard for t in mapped}
    )
    # Read on every token: the CPU's layers (each expert is, over a few tokens) and the output
    # matrix there; the token embedding only by the row.
    output_name = "token_embd.weight" if info.tied_embeddings else "output.weight"
    read = sum(t.bytes for t in mapped if t.layer is not None or (t.name == output_name and not output_on_gpu))
    if not settings.use_mmap:  # llama.cpp reads each CPU tensor into a buffer of its own
        cpu.weights = repacked + sum(t.bytes for t in mapped)
        ram_mapped_read, ram_mapped_cache = 0, 0
    else:
        cpu.weights = repacked + span
        ram_mapped_read = span if settings.use_mlock else read
        ram_mapped_cache = span - ram_mapped_read

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
        side_of_layer(layer).kv += int(cells * per_cell)

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
    layer_step = max(attention + ffn(n_ff), moe_step)
    logits = n_ubatch * (info.n_vocab + 3 * info.n_embd) * 4
    # A device that holds only repeating layers peaks in attention, with its Q, K, V, output and
    # residual rows live (measured on RPC devices: 45.26 MiB logged for the demo model at n_ctx
    # 2048 against 45.25 predicted); the FFN step comes later, without the scores.
    n_embd_kv = max(info.n_head_kv) * info.head_dim_k
    layers_only = max(attention + (4 * info.n_embd + 2 * n_embd_kv) * n_ubatch * 4, mask + ffn(n_ff), moe_step)
    # Each offload device's scheduler buffer holds the peak of its own part of the graph; the
    # device with the output layer also computes the logits. A GPU build runs large prompt
    # batches' matrix products on its main GPU even at n_gpu_layers 0 (op_offload).
    first_cuda = next((d for d in used if d.kind == "CUDA"), None)
    for share in shares:
        if share.layers or share.output or (settings.has_gpu and share.device is first_cuda):
            if share.output or not output_on_gpu:
                share.side.compute = max(layer_step, logits) if len(used) == 1 else max(layers_only, logits)
            else:
                share.side.compute = layers_only
            share.side.overhead = share.device.overhead
    if any(share.side.compute for share in shares):
        # Not yet measured: the attention of layers left on the CPU runs there, next to their KV
        # cache, so count its step in host memory; otherwise only the staged inputs.
        staging = n_ubatch * info.n_embd * 4 * 4
        cpu.compute = attention + ffn(n_ff) if not all(on_gpu) else staging
    else:
        cpu.compute = max(layer_step, logits)
    if cpu_experts and any(on_gpu[:cpu_experts]):
        # The experts kept in RAM run there: their activations, plus the rows copied from the
        # device and back (measured: 1.63 MiB logged for an 8-expert tiny model, 1.625 predicted).
        cpu.compute = max(cpu.compute, n_ubatch * (3 * n_ff * info.n_expert_used + 4 * info.n_embd) * 4)
    # llama-context.cpp: with every layer on two or more devices split by layer, the scheduler
    # pipelines micro-batches and keeps GGML_SCHED_MAX_COPIES (4) copies of each split's inputs
    # (the mask and the rows passed between devices) instead of one; not with tensor overrides.
    holding = [share for share in shares if share.layers or share.output]
    if len(holding) > 1 and n_gpu_layers > L and settings.split_mode == "layer" and not cpu_experts:
        copies = 3 * (mask + 2 * n_ubatch * info.n_embd * 4)
        for side in (cpu, *(share.side for share in shares if share.side.compute)):
            side.compute += copies
    cpu.output = info.n_vocab * 4 * settings.n_seq  # the logits kept for sampling

    gpu = Side()
    for share in shares:
        gpu.add(share.side)
    mapped_weights = ram_mapped_read + ram_mapped_cache
    ram = RamTerms(cpu.total - mapped_weights, ram_mapped_read, ram_mapped_cache)
    gpu_read, cpu_read = speed.bytes_read_per_token(info, on_gpu, output_on_gpu, cpu_experts)
    return Prediction(
        n_gpu_layers=n_gpu_layers,
        n_layer=L,
        n_ctx=n_ctx,
        gpu=gpu,
        cpu=cpu,
        layers_on_gpu=sum(on_gpu),
        output_on_gpu=output_on_gpu,
        cpu_expert_layers=cpu_experts,
        ram=ram,
        devices=shares,
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
    devices: Sequence[OffloadDevice] = (),
    *,
    ram_bandwidth: float | None = None,
    gpu_bandwidth: float | None = None,
    cpu: speed.CpuSpeed | None = None,
) -> list[Prediction]:
    """The prediction for every layer count 0..n_layer+1; with `ram_bandwidth`, its expected tok/s."""
    table = [predict(info, g, settings, devices) for g in range(info.n_layer + 2)]
    if ram_bandwidth:
        for row in table:
            row.tokens_per_s = speed.estimate_tokens_per_second(
                row, ram_bandwidth, gpu_bandwidth or speed.DEFAULT_GPU_BANDWIDTH, info=info, cpu=cpu, n_threads=settings.n_threads
            )
    return table
