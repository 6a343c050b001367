"""Memory and speed samples: GPUs (NVML), RAM and swap (psutil), the engine process (/proc).

A sample is a plain dict (msgpack-able; bytes as ints; rates in bytes/s; None = not available):

    {"t": unix time, "gpu_status": "ok" | "no NVIDIA GPU" | "NVML error: ...", "gpu_detail": str | None,
     "gpus": [{"index", "name", "memory_total", "memory_used", "memory_free", "utilization",
               "temperature", "power_w", "memory_bandwidth", "engine_memory", "other_memory",
               "processes": [{"pid", "used_memory"}] | None, "error"}],
     "host": {"ram_total", "ram_available", "ram_used", "page_cache", "swap_total", "swap_used",
              "swap_in_bps", "swap_out_bps"},
     "engine": {"pid", "rss", "anon_resident", "file_resident", "model_file_resident",
                "major_faults_ps"} | None,
     "generation": <passed through>}

`sample()` blocks on NVML and /proc for about a millisecond: call it from a worker thread so it
never delays a token. It never raises; a part that fails reads as None and is logged once.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from vramchat.daemon.nvml import Nvml

log = logging.getLogger(__name__)

HOST_KEYS = ("ram_total", "ram_available", "ram_used", "page_cache", "swap_total", "swap_used", "swap_in_bps", "swap_out_bps")
# Swap-in faster than this while generating means the model's pages are read back from swap:
# every token then waits on the disk.
SWAPPING_BPS = 1 << 20
# Major faults per second of the engine while generating: the mmapped model's pages were dropped
# under memory pressure and are re-read from the .gguf. That never shows as swap-in.
REFAULTING_PS = 64
# How often to walk the engine's smaps for the model's resident pages exactly; in between, the
# change of RssFile (a constant-time counter) is taken as the change of the model's pages.
MODEL_PAGES_EVERY_S = 10.0
# An alarm clears only once its condition is this far back from the line that started it...
CLEAR_BAND_BYTES = 256 << 20
# ...and has stayed clear this long, so a value hovering at the line does not flap.
CLEAR_AFTER_S = 5.0


class TelemetrySampler:
    """Takes samples and keeps the last `history_s` seconds of them."""

    def __init__(self, *, interval_s: float = 0.5, history_s: float = 600.0, nvml: Nvml | None = None) -> None:
        self.interval_s = interval_s
        self.history_s = history_s
        self.nvml = nvml or Nvml()
        # Trimmed by age; the bound only caps memory if samples come much faster than interval_s.
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=2 * math.ceil(history_s / interval_s) + 2)
        self._lock = threading.Lock()
        self._last_swap: tuple[float, int, int] | None = None  # monotonic time, sin, sout
        self._last_faults: tuple[int, float, int] | None = None  # pid, monotonic time, majflt
        self._model_pages: tuple[int, float, int | None, int] | None = None  # pid, when, bytes, RssFile then
        self._failing: set[str] = set()

    def sample(self, *, engine_pid: int | None, generation: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            now, mono = time.time(), time.monotonic()
            gpus = self._guard("gpu", lambda: self.nvml.devices(engine_pid), [])
            sample = {
                "t": now,
                "gpu_status": self.nvml.status,
                "gpu_detail": self.nvml.detail,
                "gpus": gpus,
                "host": self._guard("host", lambda: self._host(mono), dict.fromkeys(HOST_KEYS)),
                "engine": self._guard("engine", lambda: self._engine(engine_pid, mono), None) if engine_pid else None,
                "generation": generation,
            }
            self._history.append(sample)
            while self._history[0]["t"] < now - self.history_s:
                self._history.popleft()
            return sample

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._history)

    def latest(self) -> dict[str, Any] | None:
        return self._history[-1] if self._history else None

    def _guard(self, part: str, read: Callable[[], Any], default: Any) -> Any:
        """`read()`, or `default` when it fails; each part's failure is logged once, until it recovers."""
        try:
            value = read()
        except Exception:
            if part not in self._failing:
                self._failing.add(part)
                log.exception("telemetry: reading the %s failed; it reads as not available", part)
            return default
        self._failing.discard(part)
        return value

    def _host(self, mono: float) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        swap = psutil.swap_memory()
        swap_in_bps = swap_out_bps = None
        if self._last_swap is not None:
            then, sin, sout = self._last_swap
            elapsed = max(mono - then, 1e-3)
            swap_in_bps = max(0, swap.sin - sin) / elapsed
            swap_out_bps = max(0, swap.sout - sout) / elapsed
        self._last_swap = (mono, swap.sin, swap.sout)
        return {
            "ram_total": memory.total,
            "ram_available": memory.available,
            "ram_used": memory.used,
            # Includes the model's mmapped pages: they live in the page cache, not in swap.
            "page_cache": getattr(memory, "cached", 0) + getattr(memory, "buffers", 0),
            "swap_total": swap.total,
            "swap_used": swap.used,
            "swap_in_bps": swap_in_bps,
            "swap_out_bps": swap_out_bps,
        }

    def _engine(self, pid: int, mono: float) -> dict[str, Any] | None:
        """Counters every sample; the exact model pages (an smaps walk) every MODEL_PAGES_EVERY_S."""
        known = self._model_pages
        walk = known is None or known[0] != pid or mono - known[1] > MODEL_PAGES_EVERY_S
        memory = engine_memory(pid, model_file=walk)
        if memory is None:
            return None
        if walk:
            self._model_pages = (pid, mono, memory["model_file_resident"], memory["file_resident"])
        elif known is not None and known[2] is not None:
            # Once loaded, the engine's other file pages (shared libraries) barely change.
            moved = memory["file_resident"] - known[3]
            memory["model_file_resident"] = min(max(0, known[2] + moved), memory["file_resident"])
        faults = memory.pop("major_faults")
        memory["major_faults_ps"] = None
        if self._last_faults is not None and self._last_faults[0] == pid:
            memory["major_faults_ps"] = max(0, faults - self._last_faults[2]) / max(mono - self._last_faults[1], 1e-3)
        self._last_faults = (pid, mono, faults)
        return memory


def engine_memory(pid: int, *, model_file: bool = True) -> dict[str, Any] | None:
    """RSS split into anonymous and file-backed pages, the resident part of the mmapped .gguf
    file, and the count of major faults; None if the process is gone.

    The model is mmapped, so RSS alone misleads: its weights are file pages, which the kernel can
    drop and re-read instead of swapping. RSS, RssAnon and RssFile come from /proc/PID/status and
    majflt from /proc/PID/stat: counters read in constant time. RssFile mixes the model with shared
    libraries; only /proc/PID/smaps names each mapping's file, and walking it costs milliseconds
    on a loaded engine (4.5 ms; smaps_rollup, which cannot tell the model apart, 4.1 ms; both
    measured on SmolLM2), so `model_file=False` leaves it out (model_file_resident None).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            counters = status.read()
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    resident = None
    if model_file:
        try:
            with open(f"/proc/{pid}/smaps", "rb") as smaps:
                resident = _gguf_resident(smaps.read())
        except OSError:  # gone since, or not ours to read (ptrace rights)
            resident = None
    return {
        "pid": pid,
        "rss": _kib_field(counters, b"VmRSS:"),
        "anon_resident": _kib_field(counters, b"RssAnon:"),
        "file_resident": _kib_field(counters, b"RssFile:"),
        "model_file_resident": resident,
        "major_faults": int(fields[9]),  # field 12 of stat; the slice starts at field 3
    }


def _gguf_resident(smaps: bytes) -> int:
    """Sum of Rss over the mappings of .gguf files (a file deleted since still counts)."""
    total = 0
    at = smaps.find(b".gguf")
    while at != -1:
        end = smaps.find(b"\n", at)
        if smaps[at + 5 : end] in (b"", b" (deleted)"):
            rss_at = smaps.find(b"\nRss:", end)
            if rss_at != -1:
                total += int(smaps[rss_at + 5 : smaps.find(b"kB", rss_at)]) * 1024
        at = smaps.find(b".gguf", at + 1)
    return total


def _kib_field(text: bytes, name: bytes) -> int:
    at = text.find(name)
    return int(text[at + len(name) : text.find(b"kB", at)]) * 1024 if at != -1 else 0


class AlarmTracker:
    """Turns samples into alarms, reported once when they start and once when they clear.

    A condition starts an alarm as soon as it crosses its line. It clears only when it is back
    past a band beyond that line (CLEAR_BAND_BYTES, or half the rate) and has stayed there
    CLEAR_AFTER_S: swap-in comes in bursts, and free memory hovers.
    """

    def __init__(self, *, clear_after_s: float = CLEAR_AFTER_S) -> None:
        self.clear_after_s = clear_after_s
        self.active: dict[str, dict[str, Any]] = {}
        self._clear_since: dict[str, float] = {}

    def update(
        self,
        sample: dict[str, Any],
        *,
        generating: bool,
        cpu_side_need_bytes: int | None,
        vram_margin_bytes: int = 1 << 30,
        swap_in_threshold_bps: int = SWAPPING_BPS,
    ) -> list[dict[str, Any]]:
        checks = {
            "swapping": self._swapping(sample, generating, swap_in_threshold_bps),
            "vram_low": self._vram_low(sample, vram_margin_bytes),
            "ram_low": self._ram_low(sample, cpu_side_need_bytes),
        }
        changes = []
        now = sample.get("t") or time.time()
        for kind, (started, clear) in checks.items():
            if kind not in self.active:
                if started is not None:
                    severity, message = started
                    self.active[kind] = alarm = {"kind": kind, "active": True, "severity": severity, "message": message}
                    changes.append(alarm)
            elif not clear:
                self._clear_since.pop(kind, None)
            elif now - self._clear_since.setdefault(kind, now) >= self.clear_after_s:
                del self._clear_since[kind]
                changes.append({**self.active.pop(kind), "active": False})
        return changes

    @staticmethod
    def _swapping(sample: dict[str, Any], generating: bool, threshold: int) -> tuple[tuple[str, str] | None, bool]:
        rate = sample["host"].get("swap_in_bps") or 0
        faults = (sample.get("engine") or {}).get("major_faults_ps") or 0
        advice = "expect minutes per token; lower n_ctx or GPU layers, or pick a smaller quantization"
        started = None
        if generating and rate > threshold:
            started = ("critical", f"the system is swapping ({rate / 1048576:.0f} MiB/s read back from swap): {advice}")
        elif generating and faults > REFAULTING_PS:
            started = (
                "critical",
                f"the model's pages are re-read from disk ({faults:.0f} page faults/s): RAM is "
                f"too small to keep the CPU-side layers cached; {advice}",
            )
        return started, not generating or (rate < threshold / 2 and faults < REFAULTING_PS / 2)

    @staticmethod
    def _vram_low(sample: dict[str, Any], margin: int) -> tuple[tuple[str, str] | None, bool]:
        free = [g for g in sample["gpus"] if g.get("memory_free") is not None]
        low = [g for g in free if g["memory_free"] < margin]
        started = None
        if low:
            names = ", ".join(f"GPU {g['index']} ({g['memory_free'] / 1048576:.0f} MiB free)" for g in low)
            started = (
                "warning",
                f"VRAM is nearly full on {names}: a longer context or another program can make "
                "the next allocation fail; load with fewer GPU layers to keep a margin",
            )
        return started, all(g["memory_free"] >= margin + CLEAR_BAND_BYTES for g in free)

    @staticmethod
    def _ram_low(sample: dict[str, Any], need: int | None) -> tuple[tuple[str, str] | None, bool]:
        available = sample["host"].get("ram_available")
        if need is None or available is None:
            return None, True
        engine = sample.get("engine") or {}
        # What the CPU-side layers still need beyond what the engine already holds. The model's
        # resident file pages also count as "available" (reclaimable cache), so they are taken out.
        missing = need - (engine.get("rss") or 0)
        headroom = available - (engine.get("model_file_resident") or 0)
        started = None
        if missing > headroom:
            started = (
                "critical",
                f"RAM available ({headroom / 1073741824:.1f} GiB) is below what the CPU-side layers "
                f"still need ({missing / 1073741824:.1f} GiB): the system will swap or re-read the "
                "model from disk; move layers to the GPU, lower n_ctx, or pick a smaller quantization",
            )
        return started, headroom >= missing + CLEAR_BAND_BYTES
