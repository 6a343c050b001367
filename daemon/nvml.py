"""NVIDIA GPU readings through pynvml (nvidia-ml-py), where nothing ever raises.

As in nvitop's libnvml: NVML is initialised lazily, once. A missing library, a missing driver,
no devices, a field the device does not support, or a device that is lost all become None
("not available") plus a status line, because a dashboard must keep drawing whatever the GPU
does.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

OK = "ok"
NO_GPU = "no NVIDIA GPU"
# Newest first. nvidia-ml-py's plain nvmlDeviceGetComputeRunningProcesses calls the _v3 symbol,
# which drivers older than 510 lack (NVMLError_FunctionNotFound); nvitop falls back the same way.
_PROCESS_QUERIES = {
    "compute": ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"),
    "graphics": ("nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v2"),
}


class Nvml:
    """Per-GPU readings. `status` is "ok", "no NVIDIA GPU" or "NVML error: ..."; `detail` says why."""

    def __init__(self, module: Any | None = None) -> None:
        """`module` replaces the pynvml module (tests pass a fake at that boundary)."""
        self._module: Any = module  # pynvml, imported on first use
        self._lock = threading.Lock()
        self._initialized = False
        self._available = False
        self._static: dict[int, dict[str, Any]] = {}  # per index: name, total, bandwidth (never change)
        self._process_query: dict[str, str | None] = {}  # kind -> the versioned function that works
        self.status = "not initialized"
        self.detail: str | None = None

    def devices(self, engine_pid: int | None) -> list[dict[str, Any]]:
        """One reading per GPU, [] when there is none; a lost GPU keeps its index with None fields."""
        with self._lock:
            if not self._init():
                return []
            try:
                return self._read_all(engine_pid)
            except Exception as exc:  # a fake or a broken binding: degrade, never raise
                log.exception("NVML query failed")
                self.status, self.detail = f"NVML error: {exc}", None
                return []

    def driver_versions(self) -> tuple[str | None, str | None]:
        """The driver's version ("550.54.15") and the newest CUDA it supports ("12.4"); None each
        where NVML cannot say (no driver, or a GPU-less machine)."""
        with self._lock:
            if not self._init():
                return None, None
            try:
                driver = self._field(lambda: _text(self._module.nvmlSystemGetDriverVersion()))
                cuda = self._field(self._module.nvmlSystemGetCudaDriverVersion)
            except AttributeError:  # a binding without them
                return None, None
        return driver, f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None

    def _init(self) -> bool:
        if self._initialized:
            return self._available
        self._initialized = True
        try:
            if self._module is None:
                import pynvml

                self._module = pynvml
            self._module.nvmlInit()
            count = self._module.nvmlDeviceGetCount()
        except ImportError:
            self.status, self.detail = NO_GPU, "nvidia-ml-py is not installed"
        except Exception as exc:
            if self._is(exc, "NVMLError_LibraryNotFound"):
                self.status, self.detail = NO_GPU, "no NVIDIA driver (libnvidia-ml.so not found)"
            elif self._is(exc, "NVMLError_DriverNotLoaded"):
                self.status, self.detail = NO_GPU, "the NVIDIA driver is not loaded"
            else:
                self.status, self.detail = f"NVML error: {exc}", None
        else:
            self._available = count > 0
            self.status, self.detail = (OK, None) if count > 0 else (NO_GPU, "NVML found no devices")
        log.info("GPU telemetry: %s%s", self.status, f" ({self.detail})" if self.detail else "")
        return self._available

    def _read_all(self, engine_pid: int | None) -> list[dict[str, Any]]:
        nvml = self._module
        readings, problems = [], []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                readings.append(self._read(index, engine_pid))
            except nvml.NVMLError as exc:  # GpuIsLost, or InvalidArgument on a handle gone stale
                problems.append(f"GPU {index}: {exc}")
                name = self._static.get(index, {}).get("name")
                readings.append({**dict.fromkeys(GPU_KEYS), "index": index, "name": name, "error": str(exc)})
        self.status, self.detail = (OK, None) if not problems else ("NVML error: " + "; ".join(problems), None)
        return readings

    def _read(self, index: int, engine_pid: int | None) -> dict[str, Any]:
        nvml = self._module
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        static = self._static.get(index)
        if static is None:
            static = self._static[index] = {
                "name": self._field(lambda: _text(nvml.nvmlDeviceGetName(handle))),
                "memory_bandwidth": self._field(lambda: _peak_bandwidth(nvml, handle)),
            }
        utilization = self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        temperature = self._field(lambda: nvml.nvmlDeviceGetTemperature(handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
        power_mw = self._field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        processes = self._processes(handle)
        engine_memory = other_memory = None
        if processes is not None:
            other_memory = sum(p["used_memory"] or 0 for p in processes if p["pid"] != engine_pid)
            if engine_pid is not None:
                engine_memory = sum(p["used_memory"] or 0 for p in processes if p["pid"] == engine_pid)
        return {
            "index": index,
            "name": static["name"],
            "memory_total": int(memory.total),
            "memory_used": int(memory.used),
            "memory_free": int(memory.free),
            "utilization": int(utilization) if utilization is not None else None,
            "temperature": int(temperature) if temperature is not None else None,
            "power_w": power_mw / 1000 if power_mw is not None else None,
            "memory_bandwidth": static["memory_bandwidth"],
            "engine_memory": engine_memory,
            "other_memory": other_memory,
            "processes": processes,
            "error": None,
        }

    def _processes(self, handle: Any) -> list[dict[str, Any]] | None:
        """Compute and graphics processes merged by pid; None when NVML cannot list them.

        `used_memory` is None where NVML withholds it (NVML_VALUE_NOT_AVAILABLE: another user's
        process without the rights to see it, or WDDM). Pids are the host's: inside a container
        with its own pid namespace the engine's pid does not match.
        """
        merged: dict[int, int | None] = {}
        listed = False
        for kind in _PROCESS_QUERIES:
            entries = self._field(functools.partial(self._query_processes, kind, handle))
            if entries is None:
                continue
            listed = True
            for entry in entries:
                used = getattr(entry, "usedGpuMemory", None)
                previous = merged.get(int(entry.pid))
                merged[int(entry.pid)] = max(previous or 0, int(used)) if used is not None else previous
        if not listed:
            return None
        return [{"pid": pid, "used_memory": used} for pid, used in sorted(merged.items())]

    def _query_processes(self, kind: str, handle: Any) -> list[Any]:
        nvml = self._module
        known = self._process_query.get(kind)
        if known is not None:
            return getattr(nvml, known)(handle)
        for name in _PROCESS_QUERIES[kind]:
            query = getattr(nvml, name, None)
            if query is None:
                continue
            try:
                entries = query(handle)
            except nvml.NVMLError as exc:
                if self._is(exc, "NVMLError_FunctionNotFound"):
                    continue
                raise
            self._process_query[kind] = name
            return entries
        raise nvml.NVMLError(getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13))

    def _field(self, read: Callable[[], Any]) -> Any:
        """One reading, or None for any NVMLError (NotSupported above all) on this field."""
        try:
            return read()
        except self._module.NVMLError:
            return None

    def _is(self, exc: Exception, name: str) -> bool:
        kind = getattr(self._module, name, None)
        return isinstance(kind, type) and isinstance(exc, kind)


GPU_KEYS = (
    "index",
    "name",
    "memory_total",
    "memory_used",
    "memory_free",
    "utilization",
    "temperature",
    "power_w",
    "memory_bandwidth",
    "engine_memory",
    "other_memory",
    "processes",
    "error",
)


def _peak_bandwidth(nvml: Any, handle: Any) -> int:
    """Theoretical peak in bytes/s: bus width x the maximum memory clock x 2 transfers per clock.

    This matches the datasheets (RTX 3090: 384 bit x 9751 MHz x 2 = 936 GB/s; H100 SXM: 5120 bit x
    2619 MHz x 2 = 3.35 TB/s). It is read once per device.
    """
    bits = nvml.nvmlDeviceGetMemoryBusWidth(handle)
    mhz = nvml.nvmlDeviceGetMaxClockInfo(handle, getattr(nvml, "NVML_CLOCK_MEM", 2))
    return int(bits) * int(mhz) * 1_000_000 * 2 // 8


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
