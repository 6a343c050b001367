"""Telemetry samples as a person reads them, in plain text (`vramchat status` and `vramchat top`)."""

from __future__ import annotations

from typing import Any

from vramchat.shared.units import format_bytes

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], width: int) -> str:
    """The last `width` values as block characters, scaled to their own range."""
    recent = [v for v in values[-width:] if v is not None]
    if not recent:
        return " " * width
    low, high = min(recent), max(recent)
    span = (high - low) or 1.0
    chars = [" " if v is None else SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1)))] for v in values[-width:]]
    return "".join(chars).rjust(width)


def _rate(bps: float | None) -> str:
    return "N/A" if bps is None else f"{bps / 1048576:.1f} MiB/s"


def _value(value: Any, unit: str, digits: int = 0) -> str:
    return "N/A" if value is None else f"{value:.{digits}f}{unit}"


def gpu_lines(sample: dict[str, Any]) -> list[str]:
    if not sample["gpus"]:
        return [f"GPU   {sample['gpu_status']}"]
    lines = []
    for gpu in sample["gpus"]:
        lines.append(
            f"GPU{gpu['index']}  {gpu['name'] or 'N/A'}: {format_bytes(gpu['memory_used'])} / {format_bytes(gpu['memory_total'])} used"
            f" ({format_bytes(gpu['memory_free'])} free), engine {format_bytes(gpu['engine_memory'])}, others "
            f"{format_bytes(gpu['other_memory'])}; util {_value(gpu['utilization'], '%')}, "
            f"{_value(gpu['temperature'], '°C')}, {_value(gpu['power_w'], ' W')}"
        )
    return lines


def format_status(sample: dict[str, Any] | None, alarms: list[dict[str, Any]] = ()) -> str:  # type: ignore[assignment]
    """The memory part of `vramchat status`."""
    if sample is None:
        return "memory: no sample yet"
    host, engine = sample["host"], sample["engine"]
    swapping = host["swap_in_bps"] or 0
    lines = gpu_lines(sample)
    lines.append(
        f"RAM   {format_bytes(host['ram_used'])} used of {format_bytes(host['ram_total'])}, "
        f"{format_bytes(host['ram_available'])} available ({format_bytes(host['page_cache'])} page cache)"
    )
    lines.append(
        f"swap  {format_bytes(host['swap_used'])} used of {format_bytes(host['swap_total'])}; "
        f"in {_rate(host['swap_in_bps'])}, out {_rate(host['swap_out_bps'])}" + ("  SWAPPING" if swapping > 1 << 20 else "")
    )
    if engine:
        lines.append(
            f"engine pid {engine['pid']}: RSS {format_bytes(engine['rss'])} = model file resident "
            f"{format_bytes(engine['model_file_resident'])} + anonymous {format_bytes(engine['anon_resident'])} + other"
        )
    generation = sample.get("generation") or {}
    last = generation.get("last") or {}
    if generation.get("tokens_per_s"):
        lines.append(f"speed generating now at {generation['tokens_per_s']:.1f} tok/s")
    elif last.get("tokens_per_s"):
        lines.append(
            f"speed last reply {last['tokens_per_s']:.1f} tok/s, prompt {_value(last.get('prompt_tokens_per_s'), ' tok/s', 1)}, "
            f"first token after {_value((last.get('ttft_s') or 0) * 1000, ' ms')}"
        )
    for alarm in alarms:
        lines.append(f"ALARM {alarm['message']}")
    return "\n".join(lines)


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


def format_top(sample: dict[str, Any], history: list[dict[str, Any]], model: dict[str, Any], width: int = 80) -> str:
    """A full screen for `vramchat top`: the status lines plus history sparklines."""
    spark_width = max(10, width - 24)
    series = {
        "RAM used": [s["host"]["ram_used"] for s in history],
        "swap used": [s["host"]["swap_used"] for s in history],
        "swap in/s": [s["host"]["swap_in_bps"] for s in history],
        "tok/s": [(s.get("generation") or {}).get("tokens_per_s") for s in history],
    }
    for index, _ in enumerate(sample["gpus"]):
        series[f"GPU{index} used"] = [s["gpus"][index]["memory_used"] if len(s["gpus"]) > index else None for s in history]
    name = model.get("name") or "no model"
    lines = [f"vramchat top: {name} ({model.get('state')}), {format_split(model.get('split'), model.get('n_gpu_layers'))}"[:width], ""]
    lines += [line[:width] for line in format_status(sample).splitlines()]
    lines.append("")
    minutes = (history[-1]["t"] - history[0]["t"]) / 60 if len(history) > 1 else 0
    lines.append(f"history, last {minutes:.1f} min:")
    for label, values in series.items():
        lines.append(f"  {label:<12}{sparkline(values, spark_width)}")
    return "\n".join(lines)
