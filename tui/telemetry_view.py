"""Telemetry samples as a person reads them, in plain text (`vramchat status` and `vramchat top`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vramchat.shared.units import format_bytes

SPARK = "▁▂▃▄▅▆▇█"
# Swap-in above this is shown as SWAPPING, here and in the TUI (the daemon's alarm uses the same default line).
SWAPPING_BPS = 1 << 20
# What F7/F8, the load dialog and `vramchat doctor` say where there is no device to offload to
# (the daemon's telemetry lists no GPU), instead of a prediction of VRAM against a 0 B budget.
NO_GPU = (
    "No GPU here: GPU layers have no effect on this machine, every layer runs on the CPU. To offload "
    "layers, add a device: an NVIDIA GPU with a CUDA build, or another machine's through llama.cpp's RPC "
    "(`vramchat rpc-server` there, `vramchatd --rpc HOST:PORT` here)."
)


def sparkline(values: Sequence[float | None], width: int, high: float | None = None) -> str:
    """`values` squeezed into `width` columns (the largest value of each), drawn from 0 to `high`
    (the largest value when not given); a blank where nothing is known."""
    columns = _columns(values, width)
    known = [v for v in columns if v is not None]
    top = high if high else max(known, default=0) or 1.0
    return "".join(
        " " if v is None else SPARK[max(0, min(len(SPARK) - 1, round(v / top * (len(SPARK) - 1))))] for v in columns
    ).rjust(width)


def _columns(values: Sequence[float | None], width: int) -> list[float | None]:
    if len(values) <= width:
        return list(values)
    columns = []
    for column in range(width):
        bucket = [v for v in values[column * len(values) // width : (column + 1) * len(values) // width] if v is not None]
        columns.append(max(bucket) if bucket else None)
    return columns


def rate(bps: float | None) -> str:
    return "N/A" if bps is None else f"{bps / 1048576:.1f} MiB/s"


def swapping(sample: dict[str, Any]) -> bool:
    """Swapping now, not just holding old pages in swap."""
    return (sample["host"].get("swap_in_bps") or 0) > SWAPPING_BPS


def _value(value: Any, unit: str, digits: int = 0) -> str:
    return "N/A" if value is None else f"{value:.{digits}f}{unit}"


def rpc_devices(sample: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The sample's devices on RPC servers (`vramchat rpc-server`); a daemon before them sends none."""
    return [d for d in (sample or {}).get("devices") or [] if d["kind"] == "RPC"]


def rpc_used(device: dict[str, Any]) -> int | None:
    total, free = device.get("memory_total"), device.get("memory_free")
    return None if total is None or free is None else total - free


def rpc_lines(sample: dict[str, Any]) -> list[str]:
    return [
        f"{d['name']}  RPC device on {d['endpoint']} ({d.get('description') or 'N/A'}): {format_bytes(d['allocated'])} "
        f"allocated by the model, {format_bytes(d.get('memory_free'))} free of {format_bytes(d.get('memory_total'))}"
        for d in rpc_devices(sample)
    ]


def gpu_lines(sample: dict[str, Any]) -> list[str]:
    status = sample.get("gpu_status") or "N/A"
    if not sample["gpus"]:
        detail = sample.get("gpu_detail")
        return [f"GPU   {status}" + (f" ({detail})" if detail else "")]
    lines = [] if status == "ok" else [f"GPU   {status}"]
    for gpu in sample["gpus"]:
        if gpu.get("error"):
            lines.append(f"GPU{gpu['index']}  {gpu.get('name') or 'N/A'}: not available ({gpu['error']})")
            continue
        bandwidth = gpu.get("memory_bandwidth")
        lines += [
            f"GPU{gpu['index']}  {gpu['name'] or 'N/A'}: {format_bytes(gpu['memory_used'])} used of "
            f"{format_bytes(gpu['memory_total'])}, {format_bytes(gpu['memory_free'])} free",
            f"      engine {format_bytes(gpu['engine_memory'])}, others {format_bytes(gpu['other_memory'])}; "
            f"util {_value(gpu['utilization'], '%')}, {_value(gpu['temperature'], '°C')}, {_value(gpu['power_w'], ' W')}; "
            + ("bandwidth N/A" if bandwidth is None else f"{bandwidth / 1e9:.0f} GB/s peak"),
        ]
    return lines


def device_figures(model: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(device, its layers, predicted bytes, allocated bytes) for each offload device the loaded
    model's plan uses, by llama.cpp's names: what the planner said next to what llama.cpp logged."""
    prediction = (model.get("plan") or {}).get("prediction") or {}
    buffers = (model.get("split") or {}).get("buffers") or []
    return [
        (
            device["name"],
            f"{device['layers']} layers{' + output' if device['output'] else ''}",
            device["total"],
            sum(b["bytes"] for b in buffers if b["device"] == device["log_name"]),
        )
        for device in prediction.get("devices") or []
        if device["total"]
    ]


def ram_line(model: dict[str, Any], engine: dict[str, Any] | None) -> str | None:
    """The plan's RAM as the kernel counts it, next to the engine's /proc figures."""
    ram = ((model.get("plan") or {}).get("prediction") or {}).get("ram")
    if not ram:
        return None
    measured = (
        f"; engine: anonymous {format_bytes(engine.get('anon_resident'))}, model file resident "
        f"{format_bytes(engine.get('model_file_resident'))}"
        if engine
        else ""
    )
    return (
        f"RAM plan: resident {format_bytes(ram['anonymous'] + ram['mapped_read'])} = anonymous "
        f"{format_bytes(ram['anonymous'])} + mapped read per token {format_bytes(ram['mapped_read'])}, "
        f"page cache only {format_bytes(ram['mapped_cache'])}{measured}"
    )


def device_lines(model: dict[str, Any]) -> list[str]:
    lines = [
        f"{name:<6} {layers}: predicted {format_bytes(predicted)}, allocated {format_bytes(allocated)}"
        for name, layers, predicted, allocated in device_figures(model)
    ]
    if lines and (model.get("plan") or {}).get("dry_run"):  # compute and output came from llama.cpp's allocator
        lines.append("predicted: weights and KV by the formula, compute and output by llama.cpp's dry run")
    return lines


def format_split(split: dict[str, Any] | None, n_gpu_layers: int | None) -> str:
    """What llama.cpp allocated at load, per kind and device."""
    if not split or not split.get("buffers"):
        return "split: not reported"
    parts = [f"{b['kind']} {format_bytes(b['bytes'])} on {b['device']}" for b in split["buffers"]]
    layers = (
        f"{split['offloaded_layers']}/{split['total_layers']} layers on GPU"
        if split.get("offloaded_layers") is not None
        else f"{n_gpu_layers or 0} GPU layers asked for"
    )
    return f"split: {layers}; " + ", ".join(parts)


def format_status(
    sample: dict[str, Any] | None, alarms: Sequence[dict[str, Any]] = (), *, model: dict[str, Any] | None = None
) -> str:
    """The memory part of `vramchat status`; `model` (the daemon's model state) adds its split."""
    lines = []
    if model is not None:
        lines.append(
            f"model {model.get('name') or 'no model'} ({model.get('state') or 'idle'}), "
            + format_split(model.get("split"), model.get("n_gpu_layers"))
        )
        lines += device_lines(model)
        if line := ram_line(model, (sample or {}).get("engine")):
            lines.append(line)
    if sample is None:
        return "\n".join([*lines, "memory: no sample yet"])
    host, engine = sample["host"], sample.get("engine")
    lines += gpu_lines(sample) + rpc_lines(sample)
    lines.append(
        f"RAM   {format_bytes(host['ram_used'])} used of {format_bytes(host['ram_total'])}, "
        f"{format_bytes(host['ram_available'])} available ({format_bytes(host['page_cache'])} page cache)"
    )
    lines.append(
        f"swap  {format_bytes(host['swap_used'])} used of {format_bytes(host['swap_total'])}; "
        f"in {rate(host['swap_in_bps'])}, out {rate(host['swap_out_bps'])}" + ("  SWAPPING" if swapping(sample) else "")
    )
    if engine:
        lines.append(
            f"engine pid {engine['pid']}: RSS {format_bytes(engine['rss'])} = model file "
            f"{format_bytes(engine.get('model_file_resident'))} + anonymous {format_bytes(engine.get('anon_resident'))} + other"
        )
        if engine.get("major_faults_ps"):
            lines.append(f"      {engine['major_faults_ps']:.0f} major page faults/s (model pages read from disk)")
    else:
        lines.append("engine not running")
    generation = sample.get("generation") or {}
    last = generation.get("last") or {}
    if generation.get("tokens_per_s"):
        lines.append(f"speed generating now at {generation['tokens_per_s']:.1f} tok/s")
    elif last.get("tokens_per_s"):
        lines.append(
            f"speed last reply {last['tokens_per_s']:.1f} tok/s, prompt {_value(last.get('prompt_tokens_per_s'), ' tok/s', 1)}, "
            f"first token after {_value(None if last.get('ttft_s') is None else last['ttft_s'] * 1000, ' ms')}"
        )
    for alarm in alarms:
        lines.append(f"ALARM {alarm['message']}")
    return "\n".join(lines)


def format_top(
    sample: dict[str, Any], history: list[dict[str, Any]], model: dict[str, Any] | None = None, width: int = 80
) -> str:
    """A screen for `vramchat top`: the status lines, then a sparkline per measurement over the history."""
    label_width, value_width = 11, 12
    spark_width = max(10, width - label_width - value_width - 2)
    host = sample["host"]
    # (label, values, scale top, current value as text)
    series: list[tuple[str, list[float | None], float | None, str]] = [
        ("RAM used", [s["host"]["ram_used"] for s in history], host["ram_total"], format_bytes(host["ram_used"])),
        ("swap used", [s["host"]["swap_used"] for s in history], host["swap_total"], format_bytes(host["swap_used"])),
        ("swap in", [s["host"]["swap_in_bps"] for s in history], None, rate(host["swap_in_bps"])),
    ]
    for gpu in sample["gpus"]:
        index = gpu["index"]
        values = [next((g["memory_used"] for g in s["gpus"] if g["index"] == index), None) for s in history]
        series.append((f"GPU{index} VRAM", values, gpu["memory_total"], format_bytes(gpu["memory_used"])))
    speeds = [(s.get("generation") or {}).get("tokens_per_s") for s in history]
    now = (sample.get("generation") or {}).get("tokens_per_s")
    series.append(("tok/s", speeds, None, _value(now, " tok/s", 1)))

    lines = format_status(sample, model=model or {}).splitlines()
    minutes = (history[-1]["t"] - history[0]["t"]) / 60 if len(history) > 1 else 0.0
    lines += ["", f"history, last {minutes:.1f} min"]
    for label, values, top, current in series:
        lines.append(f"{label:<{label_width}} {sparkline(values, spark_width, top)} {current:>{value_width}}")
    return "\n".join(line[:width] for line in lines)
