"""A stand-in for pynvml, for the tests of NVML telemetry on a machine without an NVIDIA GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml


class FakePynvml:
    """Two GPUs that act like pynvml: its constants and NVMLError classes are the real ones, so
    each failure is raised exactly as the binding raises it. Fields can fail; devices can vanish."""

    def __init__(self) -> None:
        self.init_calls = 0
        self.init_error: int | None = None
        self.count = 2
        self.failing: dict[str, int] = {}  # field -> NVML error code it raises
        self.lost: dict[int, int] = {}  # index -> error code of nvmlDeviceGetHandleByIndex
        self.compute = [
            SimpleNamespace(pid=100, usedGpuMemory=3 << 30),
            SimpleNamespace(pid=200, usedGpuMemory=1 << 30),
            SimpleNamespace(pid=300, usedGpuMemory=None),
        ]  # NVML_VALUE_NOT_AVAILABLE, as pynvml gives it
        self.graphics = [SimpleNamespace(pid=400, usedGpuMemory=256 << 20)]
        self.missing_symbols: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "NVMLError")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _call(self, field: str) -> None:
        if field in self.missing_symbols:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if field in self.failing:
            raise pynvml.NVMLError(self.failing[field])

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.lost:
            raise pynvml.NVMLError(self.lost[index])
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(total=12 << 30, used=(4 + handle) << 30, free=(8 - handle) << 30)

    def nvmlDeviceGetName(self, handle: int) -> str:
        self._call("name")
        return f"NVIDIA GeForce RTX 30{handle}0"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._call("utilization")
        return SimpleNamespace(gpu=50 + handle, memory=10)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        self._call("temperature")
        return 60

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self._call("power")
        return 150_500

    def nvmlDeviceGetMemoryBusWidth(self, handle: int) -> int:
        self._call("bandwidth")
        return 384

    def nvmlDeviceGetMaxClockInfo(self, handle: int, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_MEM
        return 9751

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: int) -> list[Any]:
        self._call("compute_v3")
        self._call("processes")
        return self.compute

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: int) -> list[Any]:
        self._call("processes")
        return self.compute[:1]

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: int) -> list[Any]:
        self._call("processes")
        return self.graphics

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: int) -> list[Any]:
        self._call("processes")
        return self.graphics
