"""The dashboard: a gauge and a history sparkline per measurement, and the split predicted vs actual."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, Sparkline, Static

from vramchat.shared.units import format_bytes
from vramchat.tui.telemetry_view import device_figures, rate, rpc_devices, rpc_used, swapping
from vramchat.tui.widgets import MemoryBar, StateChanged, layer_split, vramchat_app

# How much history the sparklines show: at one sample per 0.5 s, two minutes.
HISTORY_SAMPLES = 240
BAR_WIDTH = 20
# A cell filled by 1/8 .. 7/8: a gauge moves in steps of 1/160 of its range, not 1/20.
PARTIAL = " ▏▎▍▌▋▊▉"

Sample = dict[str, Any]


def gauge(label: str, used: float | None, total: float | None, text: str) -> str:
    """`label ██████░░░░ text`; a value the daemon could not read shows as N/A, never an error."""
    if used is None or not total:
        return f"{label:<11} {'░' * BAR_WIDTH} {text}"
    eighths = max(0, min(BAR_WIDTH * 8, round(used / total * BAR_WIDTH * 8)))
    if used > 0:
        eighths = max(eighths, 1)  # anything in use shows, even 1% of a large RAM
    bar = "█" * (eighths // 8) + (PARTIAL[eighths % 8] if eighths % 8 else "")
    return f"{label:<11} {bar}{'░' * (BAR_WIDTH - len(bar))} {text}"


def _gpu(index: int) -> Callable[[Sample], dict[str, Any]]:
    return lambda s: s["gpus"][index] if len(s["gpus"]) > index else {}


def series(history: list[Sample], gpu_count: int) -> dict[str, tuple[str, list[float]]]:
    """Each measurement: id -> (gauge line from the latest sample, its history)."""
    latest = history[-1]
    host, engine = latest["host"], latest["engine"] or {}
    rows: dict[str, tuple[str, list[float]]] = {}
    for i in range(gpu_count):
        gpu = _gpu(i)(latest)
        rows[f"gpu{i}-mem"] = (
            gauge(
                f"GPU{i} VRAM",
                gpu.get("memory_used"),
                gpu.get("memory_total"),
                f"{format_bytes(gpu.get('memory_used'))} / {format_bytes(gpu.get('memory_total'))}, engine "
                f"{format_bytes(gpu.get('engine_memory'))}",
            ),
            [_gpu(i)(s).get("memory_used") or 0 for s in history],
        )
        util = gpu.get("utilization")
        rows[f"gpu{i}-util"] = (
            gauge(
                f"GPU{i} util",
                util,
                100,
                "N/A"
                if util is None
                else f"{util:.0f}%" + (f", {gpu['temperature']:.0f}°C" if gpu.get("temperature") is not None else ""),
            ),
            [_gpu(i)(s).get("utilization") or 0 for s in history],
        )
    for device in rpc_devices(latest):
        name = device["name"]
        rows[f"rpc-{name}"] = (
            gauge(
                f"{name} mem",
                rpc_used(device),
                device.get("memory_total"),
                f"{format_bytes(rpc_used(device))} / {format_bytes(device.get('memory_total'))}, model "
                f"{format_bytes(device['allocated'])}, on {device['endpoint']}",
            ),
            [next((rpc_used(d) or 0 for d in rpc_devices(s) if d["name"] == name), 0) for s in history],
        )
    rows["ram"] = (
        gauge(
            "RAM",
            host["ram_used"],
            host["ram_total"],
            f"{format_bytes(host['ram_used'])} / {format_bytes(host['ram_total'])}, {format_bytes(host['page_cache'])} cache",
        ),
        [s["host"]["ram_used"] or 0 for s in history],
    )
    rows["swap"] = (
        gauge(
            "swap",
            host["swap_used"],
            host["swap_total"],
            f"{format_bytes(host['swap_used'])} / {format_bytes(host['swap_total'])}",
        ),
        [s["host"]["swap_used"] or 0 for s in history],
    )
    rows["swap-io"] = (
        f"{'swap I/O':<11} in {rate(host['swap_in_bps'])}, out {rate(host['swap_out_bps'])}"
        + ("  SWAPPING" if swapping(latest) else ""),
        [(s["host"]["swap_in_bps"] or 0) + (s["host"]["swap_out_bps"] or 0) for s in history],
    )
    rows["engine"] = (
        f"{'engine':<11} "
        + (
            f"RSS {format_bytes(engine.get('rss'))}: file {format_bytes(engine.get('model_file_resident'))}, "
            f"anon {format_bytes(engine.get('anon_resident'))}"
            if engine
            else "not running"
        ),
        [(s["engine"] or {}).get("rss") or 0 for s in history],
    )
    generation = latest.get("generation") or {}
    now, last = generation.get("tokens_per_s"), (generation.get("last") or {}).get("tokens_per_s")
    rows["tok-s"] = (
        f"{'speed':<11} " + (f"{now:.1f} tok/s now" if now else f"last reply {last:.1f} tok/s" if last else "no reply yet"),
        [(s.get("generation") or {}).get("tokens_per_s") or 0 for s in history],
    )
    return rows


def split_text(model: dict[str, Any], latest: Sample | None) -> str:
    """What the planner predicted for the loaded model next to what llama.cpp allocated and NVML sees."""
    if model.get("state") != "ready":
        return f"model: {model.get('name') or 'none'} ({model.get('state') or 'no model'})"
    prediction = ((model.get("plan") or {}).get("prediction")) or {}
    split = model.get("split") or {}
    lines = [f"model: {model.get('name')}, {layer_split(model)}, n_ctx {model.get('n_ctx')}"]
    lines.append(f"{'':<11} {'predicted':>12} {'allocated':>12}")
    for label, side, key in (("VRAM", "gpu", "gpu_bytes"), ("RAM", "cpu", "cpu_bytes")):
        predicted = format_bytes((prediction.get(side) or {}).get("total"))
        lines.append(f"{label:<11} {predicted:>12} {format_bytes(split.get(key)):>12}")
    for name, _layers, predicted_bytes, allocated in device_figures(model):
        lines.append(f"{'  ' + name:<11} {format_bytes(predicted_bytes):>12} {format_bytes(allocated):>12}")
    ram, engine = prediction.get("ram"), (latest or {}).get("engine")
    if ram:
        lines.append(f"{'':<11} {'predicted':>12} {'/proc':>12}")
        lines.append(
            f"{'RAM anon':<11} {format_bytes(ram['anonymous']):>12} {format_bytes((engine or {}).get('anon_resident')):>12}"
        )
        mapped = ram["mapped_read"] + ram["mapped_cache"]
        file_pages = format_bytes((engine or {}).get("model_file_resident"))
        lines.append(
            f"{'RAM mapped':<11} {format_bytes(mapped):>12} {file_pages:>12}  ({format_bytes(ram['mapped_read'])} read per token)"
        )
    engine_vram = sum(g.get("engine_memory") or 0 for g in (latest or {}).get("gpus", []))
    if engine_vram:
        lines.append(f"{'NVML sees':<11} {format_bytes(engine_vram):>25} of VRAM used by the engine")
    return "\n".join(lines)


class DashboardScreen(Screen[None]):
    """Reads the app's history, model and alarms, and redraws on each `StateChanged`."""

    BINDINGS: ClassVar[list[BindingType]] = [("escape", "app.pop_screen", "Back to chat")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield MemoryBar(classes="memory-bar")
        yield Footer(compact=True)  # docked: first, so that the early return below keeps it
        with VerticalScroll(id="dashboard"):
            yield Static(id="split")
            yield Static(id="alarms")
            history = vramchat_app(self).state.history
            if not history:
                yield Label("waiting for the first telemetry sample")
                return
            latest = history[-1]
            for gpu in latest["gpus"]:
                yield Label(f"GPU{gpu['index']}: {gpu['name'] or 'N/A'}", classes="gpu-name")
            if not latest["gpus"]:
                yield Label(f"GPU: {latest.get('gpu_status') or 'no NVIDIA GPU'}", classes="gpu-name")
            for key in series(history, len(latest["gpus"])):
                yield Label("", id=f"gauge-{key}", classes="gauge")
                yield Sparkline([], id=f"spark-{key}", summary_function=max)

    def on_mount(self) -> None:
        self.refresh_from()

    def on_state_changed(self, _: StateChanged) -> None:
        self.refresh_from()

    def refresh_from(self) -> None:
        state = vramchat_app(self).state
        history = state.history[-HISTORY_SAMPLES:]
        latest = history[-1] if history else None
        gpu_count = len(latest["gpus"]) if latest else 0
        if latest and len(self.query(".gauge")) != len(series(history, gpu_count)):
            self.refresh(recompose=True)  # the first sample arrived, or GPUs appeared
            return
        for bar in self.query(MemoryBar):
            bar.show(latest, state.model)
        self.query_one("#split", Static).update(split_text(state.model, latest))
        alarms = "\n".join(f"ALARM {a['message']}" for a in state.alarms)
        self.query_one("#alarms", Static).update(alarms)
        self.query_one("#alarms", Static).display = bool(alarms)
        if latest is None:
            return
        for key, (line, values) in series(history, gpu_count).items():
            self.query_one(f"#gauge-{key}", Label).update(line)
            self.query_one(f"#spark-{key}", Sparkline).data = values
