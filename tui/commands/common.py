"""What the plain-terminal subcommands share: a client per command, JSON output, the model in words."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vramchat.shared.client import Client
from vramchat.shared.units import format_bytes
from vramchat.tui.telemetry_view import device_lines, format_split


def open_client(args: argparse.Namespace, name: str) -> Client:
    return Client(args.runtime_dir, name=f"vramchat {name}")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def describe_model(model: dict[str, Any]) -> str:
    state = model.get("state", "idle")
    name = model.get("name") or "no model"
    if state == "ready":
        return (
            f"model: {name}  ({model['n_gpu_layers']} GPU layers, n_ctx {model['n_ctx']}, "
            f"{model['n_threads']} threads, loaded in {model['load_seconds']:.2f} s)"
        )
    if state == "loading":
        progress = model.get("progress")
        return f"model: loading {name}" + (f" ({progress * 100:.0f}%)" if progress is not None else "")
    if state in ("error", "crashed"):
        return f"model: {state}: {model.get('error')}"
    if state == "unloaded":
        return f"model: {name} unloaded {model.get('unloaded_reason')}; the next request loads it again"
    return "model: none loaded (vramchat load MODEL)"


def format_plan_against_split(model: dict[str, Any]) -> str:
    """The planner's prediction next to what llama.cpp allocated."""
    plan, split = model.get("plan") or {}, model.get("split") or {}
    prediction = plan.get("prediction")
    if not prediction:
        return format_split(split, model.get("n_gpu_layers"))
    speed = f", about {prediction['tokens_per_s']:.0f} tok/s expected" if prediction.get("tokens_per_s") else ""
    return "\n".join(
        [
            f"predicted: VRAM {format_bytes(prediction['gpu']['total'])}, RAM {format_bytes(prediction['cpu']['total'])}{speed}",
            f"allocated by llama.cpp: GPU {format_bytes(split.get('gpu_bytes'))}, CPU {format_bytes(split.get('cpu_bytes'))}",
            *device_lines(model),
            *([f"fit: {plan['fit']}"] if plan.get("fit") else []),
        ]
    )
