"""`vramchat plan MODEL`: where the model's bytes would live for each n_gpu_layers, without a daemon."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import psutil

from vramchat.shared.gguf import GGUFError
from vramchat.shared.planner import (
    DEFAULT_VRAM_MARGIN,
    PlanError,
    PlanSettings,
    fit,
    gpu_bandwidth_for,
    inspect_cached,
    plan_table,
    ram_bandwidth,
    swap_check,
)
from vramchat.shared.units import format_bytes, format_count, parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="predict VRAM and RAM for each GPU layer count, before loading")
    plan.add_argument("model", help="path of a .gguf file")
    plan.add_argument("--ctx", type=int, default=4096, help="context window in tokens (default 4096)")
    which = plan.add_mutually_exclusive_group()
    which.add_argument("--gpu-layers", type=int, help="detail this layer count instead of the fitted one")
    which.add_argument("--vram-budget", type=parse_size, help="fit this much VRAM, e.g. 11.5GiB (default: free VRAM - 1 GiB)")
    plan.add_argument("--cache-type", default="f16", help="KV cache type for K and V: f16, q8_0, q4_0")
    plan.add_argument("--flash-attn", action="store_true", help="plan with flash attention (needed for a quantized V cache)")
    plan.add_argument("--fit-ctx", action="store_true", help="also find the largest context at which every layer fits")
    plan.add_argument("--vram", type=parse_size, help="plan for a GPU with this much free VRAM instead of this machine's")
    plan.add_argument("--ram", type=parse_size, help="plan for this much available RAM instead of this machine's")
    plan.add_argument("--json", action="store_true", help="the whole table as JSON, in bytes")
    plan.set_defaults(handler=run)


def this_machine_vram() -> tuple[int, str | None]:
    """Free VRAM over all NVIDIA GPUs, and the first one's name; (0, None) without any."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        name = pynvml.nvmlDeviceGetName(handles[0]) if handles else None
        return sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles), (name.decode() if isinstance(name, bytes) else name)
    except Exception:
        return 0, None


def run(args: argparse.Namespace) -> int:
    free_vram, gpu_name = (args.vram, None) if args.vram is not None else this_machine_vram()
    try:
        info = inspect_cached(args.model)
        settings = PlanSettings(n_ctx=args.ctx, cache_type_k=args.cache_type, cache_type_v=args.cache_type,
                                flash_attn=args.flash_attn, has_gpu=free_vram > 0)
        settings.check()
        plan_table(info, settings)  # model-specific refusals (a q8_0 cache on a head size of 16...)
    except (GGUFError, PlanError, OSError) as exc:
        print(f"vramchat plan: {exc}", file=sys.stderr)
        return 2
    available_ram = args.ram if args.ram is not None else psutil.virtual_memory().available
    budget = args.vram_budget if args.vram_budget is not None else max(0, free_vram - DEFAULT_VRAM_MARGIN)
    table = plan_table(info, settings, ram_bandwidth=ram_bandwidth(), gpu_bandwidth=gpu_bandwidth_for(gpu_name))
    fitted = fit(info, budget, settings, fit_ctx=args.fit_ctx)
    if args.fit_ctx:
        settings = replace(settings, n_ctx=fitted.n_ctx)
        table = plan_table(info, settings, ram_bandwidth=ram_bandwidth(), gpu_bandwidth=gpu_bandwidth_for(gpu_name))
    chosen = table[args.gpu_layers] if args.gpu_layers is not None and 0 <= args.gpu_layers < len(table) else table[fitted.n_gpu_layers]
    if args.gpu_layers is not None and chosen.n_gpu_layers != args.gpu_layers:
        print(f"vramchat plan: --gpu-layers must be between 0 and {info.n_layer + 1} for this model", file=sys.stderr)
        return 2

    if args.json:
        json.dump({"model": info.to_dict(), "vram_budget": budget, "available_ram": available_ram, "fit": fitted.to_dict(),
                   "table": [row.to_dict() for row in table], "swap": swap_check(chosen, available_ram).to_dict()}, sys.stdout, indent=2)
        print()
        return 0
    print(describe(info, settings, free_vram, gpu_name, available_ram, budget, args.vram is not None))
    print(f"\n{'GPU layers':>10} {'VRAM':>12} {'RAM':>12} {'swap risk':>10} {'tok/s (max)':>12}")
    for row in table:
        risk = "SWAP" if swap_check(row, available_ram).would_swap else "-"
        mark = "  <- fits the budget" if row.n_gpu_layers == fitted.n_gpu_layers else ""
        print(f"{row.n_gpu_layers:>10} {format_bytes(row.gpu.total):>12} {format_bytes(row.cpu.total):>12} {risk:>10} "
              f"{row.tokens_per_s or 0:>12.1f}{mark}")
    print(terms(chosen, available_ram))
    return 0


def describe(info: Any, settings: PlanSettings, free_vram: int, gpu_name: str | None, ram: int, budget: int, vram_given: bool) -> str:
    gpu = f"{format_bytes(free_vram)} free VRAM" + (" (given)" if vram_given else f" on {gpu_name}" if gpu_name else " (no NVIDIA GPU found, so every layer stays on the CPU; use --vram to plan for a GPU)")
    return (f"{info.name or info.path}: {info.architecture}, {format_count(info.parameters)} parameters, {info.file_type}, "
            f"{info.n_layer} layers + output, trained context {info.n_ctx_train}\n"
            f"n_ctx {settings.n_ctx}, KV {settings.cache_type_k}/{settings.cache_type_v}, flash attention "
            f"{'on' if settings.flash_attn else 'off'}; {gpu}, budget {format_bytes(budget)}; {format_bytes(ram)} RAM available")


def terms(row: Any, available_ram: int) -> str:
    lines = [f"\n{row.n_gpu_layers} GPU layers ({row.layers_on_gpu} of {row.n_layer} repeating layers"
             f"{' + output' if row.output_on_gpu else ''}), n_ctx {row.n_ctx}:"]
    for label, side in (("GPU", row.gpu), ("CPU", row.cpu)):
        lines.append(f"  {label}: weights {format_bytes(side.weights)} + KV {format_bytes(side.kv)} + compute "
                     f"{format_bytes(side.compute)} + output {format_bytes(side.output)} + overhead {format_bytes(side.overhead)}"
                     f" = {format_bytes(side.total)}")
    verdict = swap_check(row, available_ram)
    if verdict.would_swap:
        lines.append("  " + verdict.message)
    lines.append("  tok/s is an upper bound from memory bandwidth; small models are limited by compute instead.")
    return "\n".join(lines)
