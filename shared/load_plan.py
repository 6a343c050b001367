"""A load decided before it happens: the fit to each device's budget, the machine, the swap guard.

The daemon, the TUI's load dialog and `vramchat plan` all build a LoadPlan with `plan_load`, so
they cannot disagree. The bytes themselves are shared/planner.py's `predict`, the fit
shared/fit.py's; before a load, shared/exact.py puts llama.cpp's own compute and output buffers
in place of the formula's (`LoadPlan.formula` then keeps the formula's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from vramchat.shared import placement, speed
from vramchat.shared.fit import AUTO, Fit, choose_kv_types, experts_in_ram, fit
from vramchat.shared.gguf import GGUFInfo
from vramchat.shared.load_options import cpu_tensor_patterns, llama_args
from vramchat.shared.placement import OffloadDevice
from vramchat.shared.planner import SOME_GPU, PlanError, PlanSettings, Prediction, plan_table, predict
from vramchat.shared.units import format_bytes, parse_size

DEFAULT_VRAM_MARGIN = 1 << 30  # left free on each device by default


def fit_reason(fitted: Fit, tokens_per_s: float) -> str:
    """ "experts of layers 0-35 in RAM, everything else on CUDA0: 11.2 of 11.5 GiB, 18 tok/s predicted" """
    row = fitted.prediction
    used = [share for share in row.devices if share.layers or share.output]
    where = ", ".join(share.device.name for share in used) or "the CPU"
    held = " + ".join(format_bytes(share.side.total) for share in used) or "0 B"
    of = f"{held} of {format_bytes(fitted.budget)}"
    if row.cpu_expert_layers and row.n_gpu_layers == row.n_layer + 1:
        layers = "layer 0" if row.cpu_expert_layers == 1 else f"layers 0-{row.cpu_expert_layers - 1}"
        return f"experts of {layers} in RAM, everything else on {where}: {of}, {tokens_per_s:.0f} tok/s predicted"
    if not used:
        return f"every layer on the CPU (nothing fits {format_bytes(fitted.budget)}), {tokens_per_s:.0f} tok/s predicted"
    return f"{row.n_gpu_layers} of {row.n_layer + 1} layers on {where}: {of}, {tokens_per_s:.0f} tok/s predicted"


@dataclass(frozen=True)
class Machine:
    """The daemon's machine as a reload would find it: the engine being replaced gives its VRAM
    and its anonymous RAM back before the new one loads."""

    free_vram: int = 0  # a GPU planned from afar (`vramchat plan --vram`), when `devices` is empty
    available_ram: int = 0
    gpu_name: str | None = None
    # Bytes/s; None: measure this machine's (speed.ram_bandwidth, cached after the first time).
    ram_bandwidth: float | None = None
    cpu_speed: speed.CpuSpeed | None = None  # None: measure this machine's (speed.cpu_speed, cached)
    devices: tuple[OffloadDevice, ...] = ()  # what llama.cpp will offload to, in its order

    @property
    def offload_devices(self) -> tuple[OffloadDevice, ...]:
        if self.devices or self.free_vram <= 0:
            return self.devices
        return (replace(SOME_GPU, free=self.free_vram, total=self.free_vram, description=self.gpu_name),)

    @property
    def has_gpu(self) -> bool:
        """A local GPU: its CUDA context and a compute buffer are there even at n_gpu_layers 0. An
        RPC device alone is none: at n_gpu_layers 0 llama.cpp gives it nothing."""
        return self.gpu_name is not None or any(d.kind == "CUDA" for d in self.offload_devices)

    @classmethod
    def from_sample(cls, sample: dict[str, Any] | None, rpc_devices: Sequence[OffloadDevice] | None = None) -> Machine:
        """From a telemetry sample (daemon/telemetry.py) and the RPC devices a load would use (which
        come first in llama.cpp's order; by default the sample's, what the loaded model holds there
        counted as free); an empty machine before the first sample."""
        if sample is None:
            return cls(devices=tuple(rpc_devices or ()))
        if rpc_devices is None:
            listed = [d for d in sample.get("devices") or [] if d["kind"] == "RPC"]
            rpc_devices = [OffloadDevice.from_rpc(d, d.get("allocated") or 0) for d in listed]
        gpus = [
            OffloadDevice(
                f"CUDA{g['index']}",
                "CUDA",
                free=(g.get("memory_free") or 0) + (g.get("engine_memory") or 0),
                total=g.get("memory_total") or 0,
                description=g.get("name"),
            )
            for g in sample["gpus"]
        ]
        ram = (sample["host"].get("ram_available") or 0) + ((sample.get("engine") or {}).get("anon_resident") or 0)
        name = (sample["gpus"][0].get("name") or "unknown GPU") if sample["gpus"] else None
        return cls(available_ram=ram, gpu_name=name, devices=(*rpc_devices, *gpus))


@dataclass
class SwapVerdict:
    would_swap: bool
    needed: int
    available: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def swap_check(prediction: Prediction, available_ram: int) -> SwapVerdict:
    """Will what must stay resident fit in available RAM: the anonymous memory (KV, compute,
    repacked weights) and the mapped weights every token reads? The rest of the mapping is page
    cache the kernel drops first (planner.RamTerms)."""
    needed = prediction.ram.resident
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
    """Everything decided about a load before it happens."""

    info: GGUFInfo
    settings: PlanSettings  # as asked (tensor_split: the person's, if any)
    machine: Machine
    budget: int  # VRAM the layers may fill, over every device
    fitted: Fit  # the most layers within the budgets
    prediction: Prediction  # for the chosen layer count, with its tokens_per_s
    swap: SwapVerdict
    ram_bandwidth: float
    gpu_bandwidth: float
    cpu_speed: speed.CpuSpeed
    devices: tuple[OffloadDevice, ...] = field(default_factory=tuple)  # the offload devices, in llama.cpp's order
    # What the load passes to llama.cpp: with several devices, the layer count of each, so that
    # llama.cpp places them as predicted even if free memory moved since.
    tensor_split: tuple[float, ...] | None = None
    # How the fit gives memory back when llama.cpp's figures exceed a budget: a layer, or the
    # experts of one more layer to RAM; None for a layer count the person chose.
    steps_down: Literal["layer", "experts"] | None = None
    # After a dry run (shared/exact.py): the formula's own prediction of this layout, and the runs.
    formula: Prediction | None = None
    dry_runs: int = 0
    dry_run_seconds: float = 0.0

    @property
    def n_gpu_layers(self) -> int:
        return self.prediction.n_gpu_layers

    def table(self) -> list[Prediction]:
        """The prediction for every layer count 0..n_layer+1, at this plan's settings."""
        return plan_table(
            self.info,
            self.settings,
            self.devices,
            ram_bandwidth=self.ram_bandwidth,
            gpu_bandwidth=self.gpu_bandwidth,
            cpu=self.cpu_speed,
        )

    def to_dict(self) -> dict[str, Any]:
        """The `plan` a `model` event carries (docs/protocol.md): each side says where each of its
        terms comes from, and after a dry run, what the formula had for those llama.cpp replaced."""
        prediction = self.prediction.to_dict()
        formula = self.formula.to_dict() if self.formula else None
        source = {term: "formula" for term in ("weights", "kv", "compute", "output", "overhead")}
        if formula:
            source |= {"compute": "llama.cpp", "output": "llama.cpp"}
        sides = [(prediction[key], formula and formula[key]) for key in ("gpu", "cpu")]
        sides += zip(prediction["devices"], formula["devices"] if formula else [None] * len(prediction["devices"]), strict=True)
        for side, before in sides:
            side["source"] = dict(source)
            if before:
                side["formula"] = {"compute": before["compute"], "output": before["output"]}
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "vram_budget": self.budget,
            "budgets": self.fitted.budgets,
            "fit": self.fitted.reason,
            "tensor_split": list(self.tensor_split) if self.tensor_split else None,
            "split_mode": self.settings.split_mode,
            "main_gpu": self.settings.main_gpu,
            "prediction": prediction,
            "swap": self.swap.to_dict(),
            "dry_run": {"runs": self.dry_runs, "seconds": self.dry_run_seconds} if self.formula else None,
        }

    def llama_load(self, rpc_servers: Sequence[str] = ()) -> dict[str, Any]:
        """What llama.cpp is given for this layout: the fields of the engine's `load` message that make
        it (daemon/llama/engine.py), which the dry run takes too (daemon/llama/dry_run.py)."""
        return {
            "model_path": self.info.path,
            "llama": llama_args(self.settings, n_gpu_layers=self.n_gpu_layers, tensor_split=self.tensor_split),
            "cpu_tensors": tuple(cpu_tensor_patterns(self.settings, self.info.n_layer)),
            "flash_attn_auto": self.settings.flash_attn == "auto",
            "rpc_servers": tuple(rpc_servers),
            "devices": tuple(d.name for d in self.devices) if rpc_servers else (),
        }


def device_budgets(devices: Sequence[OffloadDevice], vram_budget: int | str | Mapping[str, int | str] | None) -> list[int]:
    """Each used device's budget: by default its free memory less a margin; one size, shared out by
    free memory; or sizes by device name ({"RPC0": "2GiB"}, or as typed: "RPC0=2GiB,CUDA0=10GiB"),
    others keeping the default."""
    default = [max(0, d.free - DEFAULT_VRAM_MARGIN) for d in devices]
    if isinstance(vram_budget, str) and "=" in vram_budget:
        vram_budget = dict(_named_size(part) for part in vram_budget.split(","))
    if vram_budget is None or vram_budget == "":
        return default
    if isinstance(vram_budget, Mapping):
        names = {d.name for d in devices}
        if unknown := sorted(set(vram_budget) - names):
            raise PlanError(
                f"no offload device named {', '.join(unknown)}; this load's are: {', '.join(sorted(names)) or 'none'}"
            )
        sizes = {name: _size(value) for name, value in vram_budget.items()}
        return [sizes.get(d.name, default[i]) for i, d in enumerate(devices)]
    total = _size(vram_budget)
    free = [d.free for d in devices]
    if len(devices) < 2 or not sum(free):
        return [total] + [0] * (len(devices) - 1)
    return [int(total * f / sum(free)) for f in free]


def _named_size(text: str) -> tuple[str, str]:
    name, equals, size = text.partition("=")
    if not equals or not name.strip():
        raise PlanError(f"a budget per device is NAME=SIZE, e.g. RPC0=2GiB; not {text!r}")
    return name.strip(), size.strip()


def _size(value: int | str) -> int:
    try:
        size = parse_size(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise PlanError(f"VRAM budget: {exc}") from None
    if size < 0:
        raise PlanError(f"a VRAM budget must not be negative, not {value}")
    return size


def plan_load(
    info: GGUFInfo,
    machine: Machine,
    n_gpu_layers: int | Literal["auto"],
    settings: PlanSettings,
    *,
    vram_budget: int | str | Mapping[str, int | str] | None = None,
    fit_ctx: bool = False,
) -> LoadPlan:
    """Plan a load of `info` on `machine`: resolve "auto" against each device's budget (by default
    its free memory less a margin), predict every term on every device, estimate the speed and
    judge the swap risk. With several devices, the plan's settings carry the tensor_split that
    makes llama.cpp place the layers as predicted (whole layer counts per device).

    With `fit_ctx`, n_ctx is first raised to the largest at which every layer fits (see `fit`).
    Raises PlanError with a message a person can act on for settings the model cannot take.
    """
    settings = replace(settings, has_gpu=settings.has_gpu or machine.has_gpu)
    devices = machine.offload_devices
    try:
        used = placement.used_devices(devices or [SOME_GPU], settings.split_mode, settings.main_gpu)
    except placement.PlacementError as exc:
        raise PlanError(str(exc)) from None
    budgets = device_budgets(used, vram_budget)
    kv_choice = ""
    if AUTO in (settings.cache_type_k, settings.cache_type_v):
        settings, kv_choice = choose_kv_types(info, budgets, settings, devices, fit_ctx=fit_ctx)
    fitted = fit(info, budgets, settings, devices, fit_ctx=fit_ctx)
    if fit_ctx:
        settings = replace(settings, n_ctx=fitted.n_ctx)
    if n_gpu_layers != "auto" and not 0 <= n_gpu_layers <= info.n_layer + 1:
        raise PlanError(
            f"n_gpu_layers {n_gpu_layers} is outside what this model has: {info.n_layer} layers + the output layer; "
            f'choose 0..{info.n_layer + 1}, or "auto" to fit the VRAM budget'
        )
    ram_bw = machine.ram_bandwidth or speed.ram_bandwidth()
    gpu_bw = speed.gpu_bandwidth_for(machine.gpu_name)
    cpu = machine.cpu_speed or speed.cpu_speed()

    def tokens_per_s(row: Prediction) -> float:
        return speed.estimate_tokens_per_second(row, ram_bw, gpu_bw, info=info, cpu=cpu, n_threads=settings.n_threads)

    fitted.reason = fit_reason(fitted, tokens_per_s(fitted.prediction)) + kv_choice
    steps_down: Literal["layer", "experts"] | None = "layer" if n_gpu_layers == "auto" else None
    if n_gpu_layers == "auto" and settings.n_cpu_moe is None and info.n_expert:
        # The other way to fill the budget: every layer offloaded, the experts of the first ones in RAM.
        experts = experts_in_ram(info, budgets, settings, devices)
        split_speed = tokens_per_s(fitted.prediction)
        if (
            experts is not None
            and tokens_per_s(experts.prediction) > split_speed
            and not swap_check(experts.prediction, machine.available_ram).would_swap
        ):
            experts.reason = (
                f"{fit_reason(experts, tokens_per_s(experts.prediction))}; a layer split would give {split_speed:.0f}{kv_choice}"
            )
            fitted, steps_down = experts, "experts"
            settings = replace(settings, n_cpu_moe=experts.prediction.cpu_expert_layers)
    prediction = fitted.prediction if n_gpu_layers == "auto" else predict(info, n_gpu_layers, settings, devices)
    tensor_split = settings.tensor_split
    if len(used) > 1 and settings.split_mode == "layer":
        split = tuple(float(share.layers + share.output) for share in prediction.devices)
        tensor_split = split if any(split) else None
    prediction.tokens_per_s = tokens_per_s(prediction)
    return LoadPlan(
        info,
        settings,
        machine,
        sum(budgets),
        fitted,
        prediction,
        swap_check(prediction, machine.available_ram),
        ram_bw,
        gpu_bw,
        cpu,
        devices,
        tensor_split,
        steps_down,
    )
