"""NVIDIA GPU readings through pynvml (nvidia-ml-py), where nothing ever raises.

As in nvitop's libnvml: NVML is initialised lazily, once. A missing library, a missing driver,
no devices, a field the device does not support, or a device that is lost all become None
("not available") plus a status line, because a dashboard must keep drawing whatever the GPU
does.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any, Callable

log = logging.getLogger(__name__)

NO_GPU = "no NVIDIA GPU"


class Nvml:
    def __init__(self, module: ModuleType | Any | None = None) -> None:
        """`module` replaces the pynvml module (tests pass a fake at that boundary)."""
        self._module = module
        self._initialized = False
        self.status = "not initialized"

    def _init(self) -> bool:
        if self._initialized:
            return self.status == "ok"
        self._initialized = True
        try:
            if self._module is None:
                import pynvml

                self._module = pynvml
            self._module.nvmlInit()
            count = self._module.nvmlDeviceGetCount()
        except ImportError:
            self.status = f"{NO_GPU} (nvidia-ml-py is not installed)"
            return False
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.status = NO_GPU if _error_code(exc) in (9, 12) else f"NVML error: {exc}"
            log.info("GPU telemetry unavailable: %s", self.status)
            return False
        self.status = "ok" if count > 0 else NO_GPU
        return count > 0

    def devices(self, engine_pid: int | None) -> list[dict[str, Any]]:
        """One reading per GPU; [] when there is none. `status` says why."""
        if not self._init():
            return []
        nvml = self._module
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            self.status = f"NVML error: {exc}"
            return []
        readings = []
        lost = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # GPU is lost, or unplugged since the last sample
                lost.append(f"GPU {index}: {exc}")
                continue
            engine_memory, other_memory = self._process_memory(handle, engine_pid)
            utilization = _optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            power_mw = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            readings.append(
                {
                    "index": index,
                    "name": _optional(lambda: _text(nvml.nvmlDeviceGetName(handle))),
                    "memory_total": int(memory.total),
                    "memory_used": int(memory.used),
                    "memory_free": int(memory.free),
                    "utilization": int(utilization.gpu) if utilization is not None else None,
                    "temperature": _optional(lambda: int(nvml.nvmlDeviceGetTemperature(handle, 0))),  # NVML_TEMPERATURE_GPU
                    "power_w": power_mw / 1000 if power_mw is not None else None,
                    "engine_memory": engine_memory,
                    "other_memory": other_memory,
                }
            )
        self.status = "ok" if not lost else "; ".join(lost)
        return readings

    def _process_memory(self, handle: Any, engine_pid: int | None) -> tuple[int | None, int | None]:
        """GPU memory of the engine process, and of every other process (None if unknown)."""
        processes = _optional(lambda: self._module.nvmlDeviceGetComputeRunningProcesses(handle))
        if processes is None:
            return None, None
        engine, other = 0, 0
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            if used is None:  # NVML_VALUE_NOT_AVAILABLE, e.g. without the rights to see it
                continue
            if engine_pid is not None and process.pid == engine_pid:
                engine += int(used)
            else:
                other += int(used)
        return (engine if engine_pid is not None else None), other


def _optional(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception:  # NVMLError_NotSupported and friends: this field is not available
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _error_code(exc: Exception) -> int | None:
    return getattr(exc, "value", None)
