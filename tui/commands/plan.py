"""`vramchat plan MODEL`: where the model's bytes would live for each n_gpu_layers, without a daemon.

The table is the formula's, for every layer count (shared/planner.py). With --exact, the layout it
picks is checked as the daemon checks a load: a dry run of llama.cpp's own allocator in a process
of its own (shared/exact.py), whose compute and output buffers replace the formula's.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Literal

import psutil

from vramchat.shared import load_options
from vramchat.shared.exact import DryRunError, checked, dry_run
from vramchat.shared.gguf import GGUFError, inspect_cached, quant_name
from vramchat.shared.load_options import settings_from
from vramchat.shared.load_plan import LoadPlan, Machine, plan_load, swap_check
from vramchat.shared.planner import PlanError, Prediction, Side
from vramchat.shared.units import format_bytes, format_count, parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="predict VRAM and RAM for each GPU layer count, before loading")
    plan.add_argument("model", help="path of a .gguf file")
    plan.add_argument("--ctx", type=int, default=4096, help="context window in tokens (default 4096)")
    which = plan.add_mutually_exclusive_group()
    which.add_argument("--gpu-layers", type=int, help="detail this layer count instead of the fitted one")
    which.add_argument(
        "--vram-budget", help="fit this much VRAM, e.g. 11.5GiB, or RPC0=2GiB,CUDA0=10GiB (default: free VRAM - 1 GiB each)"
    )
    plan.add_argument("--fit-ctx", action="store_true", help="also find the largest context at which every layer fits")
    plan.add_argument("--vram", type=parse_size, help="plan for a GPU with this much free VRAM instead of this machine's")
    plan.add_argument("--ram", type=parse_size, help="plan for this much available RAM instead of this machine's")
    plan.add_argument("--json", action="store_true", help="the whole table as JSON, in bytes")
    plan.add_argument(
        "--exact", action="store_true", help="check the chosen layout with llama.cpp's own allocator (a dry run, ~1 s)"
    )
    load_options.add_arguments(plan)
    plan.set_defaults(handler=run)


def this_machine_vram() -> tuple[int, str | None]:
    """Free VRAM over all NVIDIA GPUs, and the first one's name; (0, None) without any."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        name = pynvml.nvmlDeviceGetName(handles[0]) if handles else None
        free = sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles)
        return free, (name.decode() if isinstance(name, bytes) else name)
    except Exception:
        return 0, None


def run(args: argparse.Namespace) -> int:
    free_vram, gpu_name = (args.vram, None) if args.vram is not None else this_machine_vram()
    available_ram = args.ram if args.ram is not None else psutil.virtual_memory().available
    layers: int | Literal["auto"] = "auto" if args.gpu_layers is None else args.gpu_layers
    try:
        settings = settings_from(load_options.request_fields(args), {}, args.ctx)
        info = inspect_cached(args.model)
        plan = plan_load(
            info,
            Machine(free_vram, available_ram, gpu_name),
            layers,
            settings,
            vram_budget=args.vram_budget,
            fit_ctx=args.fit_ctx,
        )
        table = plan.table()
        # A dry run builds the layout on this machine's devices: not for a GPU described by --vram.
        exact = args.exact and args.vram is None and (gpu_name is not None or plan.n_gpu_layers == 0)
        if exact:
            plan = checked(plan, lambda layout: dry_run(layout.llama_load()))
    except (GGUFError, PlanError, OSError) as exc:
        print(f"vramchat plan: {exc}", file=sys.stderr)
        return 2
    except DryRunError as exc:
        print(f"vramchat plan: llama.cpp cannot load this layout: {exc}", file=sys.stderr)
        return 2

    if args.json:
        json.dump(
            {
                "model": info.to_dict(),
                "vram_budget": plan.budget,
                "available_ram": available_ram,
                "fit": plan.fitted.to_dict(),
                "table": [row.to_dict() for row in table],
                "swap": plan.swap.to_dict(),
                **({"checked": plan.to_dict()} if exact else {}),  # the plan llama.cpp's dry run checked
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    print(describe(plan, args.vram is not None))
    print(f"\n{'GPU layers':>10} {'VRAM':>12} {'RAM':>12} {'swap risk':>10} {'tok/s':>12}")
    for row in table:
        risk = "SWAP" if swap_check(row, available_ram).would_swap else "-"
        mark = "  <- fits the budget" if row.n_gpu_layers == plan.fitted.n_gpu_layers else ""
        print(
            f"{row.n_gpu_layers:>10} {format_bytes(row.gpu.total):>12} {format_bytes(row.cpu.total):>12} {risk:>10} "
            f"{row.tokens_per_s or 0:>12.1f}{mark}"
        )
    print(f"Every row: the formula's figures (docs/planner.md). {EXACT if exact else NOT_HERE if args.exact else FORMULA_ONLY}")
    print(terms(plan))
    return 0


EXACT = "Below: the chosen layout with llama.cpp's own compute and output buffers."
FORMULA_ONLY = "Below too: --exact checks the chosen layout with llama.cpp's allocator."
NOT_HERE = "Below too: --exact builds the layout on this machine's devices, and this plan is for a GPU not here."


FLASH_ATTN_WORDS = {True: "on", False: "off", "auto": "auto (planned as on)"}


def describe(plan: LoadPlan, vram_given: bool) -> str:
    info, settings, host = plan.info, plan.settings, plan.machine
    no_gpu = " (no NVIDIA GPU found, so every layer stays on the CPU; use --vram to plan for a GPU)"
    where = " (given)" if vram_given else f" on {host.gpu_name}" if host.gpu_name else no_gpu
    gpu = f"{format_bytes(host.free_vram)} free VRAM" + where
    return (
        f"{info.name or info.path}: {info.architecture}, {format_count(info.parameters)} parameters, "
        f"{quant_name(info.file_type)}, {info.n_layer} layers + output, trained context {info.n_ctx_train}\n"
        f"n_ctx {settings.n_ctx}, KV {settings.cache_type_k}/{settings.cache_type_v}, flash attention "
        f"{FLASH_ATTN_WORDS[settings.flash_attn]}; {gpu}, budget {format_bytes(plan.budget)}; "
        f"{format_bytes(host.available_ram)} RAM available"
    )


def sides(row: Prediction) -> list[tuple[str, Side]]:
    """Each offload device's side (or the GPU's, with one), then the CPU's."""
    shares = [
        (f"{share.device.name} ({share.layers} layers{' + output' if share.output else ''})", share.side) for share in row.devices
    ]
    return [*(shares if len(shares) > 1 else [("GPU", row.gpu)]), ("CPU", row.cpu)]


def terms(plan: LoadPlan) -> str:
    row = plan.prediction
    lines = [
        f"\n{row.n_gpu_layers} GPU layers ({row.layers_on_gpu} of {row.n_layer} repeating layers"
        f"{' + output' if row.output_on_gpu else ''}), n_ctx {row.n_ctx}:"
    ]
    formula: list[Side | None] = [side for _, side in sides(plan.formula)] if plan.formula else [None] * len(sides(row))
    for (label, side), before in zip(sides(row), formula, strict=True):
        lines.append(
            f"  {label}: weights {format_bytes(side.weights)} + KV {format_bytes(side.kv)} + compute "
            f"{format_bytes(side.compute)} + output {format_bytes(side.output)} + overhead {format_bytes(side.overhead)}"
            f" = {format_bytes(side.total)}"
        )
        if before is not None and (before.compute or before.output or side.compute or side.output):
            lines.append(
                f"    formula / llama.cpp: compute {format_bytes(before.compute)} / {format_bytes(side.compute)}, "
                f"output {format_bytes(before.output)} / {format_bytes(side.output)}"
            )
    if plan.formula:
        runs = f"{plan.dry_runs} dry run{'s' if plan.dry_runs > 1 else ''}, {plan.dry_run_seconds:.2f} s"
        lines.append(f"  compute and output: llama.cpp's allocator ({runs}); the rest: the formula. Fit: {plan.fitted.reason}")
    if plan.swap.would_swap:
        lines.append("  " + plan.swap.message)
    lines.append("  tok/s: expected from this machine's measured RAM bandwidth and matrix throughput (docs/planner.md).")
    return "\n".join(lines)
