"""The NVML wrapper: the real path on this GPU-less machine, and a fake at the pynvml boundary."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vramchat.daemon.nvml import NO_GPU, Nvml


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__({3: "Not Supported", 9: "Driver Not Loaded", 15: "GPU is lost", 999: "Unknown Error"}[value])
        self.value = value


class FakePynvml:
    """Two GPUs; fields can be made to fail, and a device can disappear."""

    def __init__(self) -> None:
        self.init_calls = 0
        self.failing: set[str] = set()
        self.lost: set[int] = set()
        self.init_error: int | None = None

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.lost:
            raise NVMLError(15)
        return index

    def _maybe_fail(self, name: str) -> None:
        if name in self.failing:
            raise NVMLError(3 if name != "power" else 999)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(total=12 << 30, used=(4 + handle) << 30, free=(8 - handle) << 30)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        self._maybe_fail("name")
        return f"NVIDIA GeForce RTX 30{handle}0".encode()

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._maybe_fail("utilization")
        return SimpleNamespace(gpu=50 + handle, memory=10)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        self._maybe_fail("temperature")
        return 60

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self._maybe_fail("power")
        return 150_500

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        self._maybe_fail("processes")
        return [SimpleNamespace(pid=100, usedGpuMemory=3 << 30), SimpleNamespace(pid=200, usedGpuMemory=1 << 30),
                SimpleNamespace(pid=300, usedGpuMemory=None)]


def test_real_pynvml_without_a_gpu_reports_no_gpu_and_does_not_raise() -> None:
    nvml = Nvml()
    assert nvml.devices(engine_pid=123) == []
    assert nvml.status.startswith(NO_GPU)
    assert nvml.devices(engine_pid=None) == []  # initialised once; still no exception


def test_normal_values_and_process_memory_split_by_pid() -> None:
    fake = FakePynvml()
    gpus = Nvml(fake).devices(engine_pid=100)
    assert len(gpus) == 2
    first = gpus[0]
    assert first["name"] == "NVIDIA GeForce RTX 3000"
    assert (first["memory_total"], first["memory_used"], first["memory_free"]) == (12 << 30, 4 << 30, 8 << 30)
    assert (first["utilization"], first["temperature"], first["power_w"]) == (50, 60, 150.5)
    assert (first["engine_memory"], first["other_memory"]) == (3 << 30, 1 << 30)


def test_nvml_is_initialised_once() -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    for _ in range(3):
        nvml.devices(engine_pid=None)
    assert fake.init_calls == 1


def test_errors_on_single_fields_become_not_available() -> None:
    fake = FakePynvml()
    fake.failing = {"name", "utilization", "temperature", "power", "processes"}
    gpu = Nvml(fake).devices(engine_pid=100)[0]
    assert gpu["memory_used"] == 4 << 30
    assert all(gpu[k] is None for k in ("name", "utilization", "temperature", "power_w", "engine_memory", "other_memory"))


def test_a_device_that_disappears_is_dropped_and_reported() -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    assert len(nvml.devices(engine_pid=None)) == 2 and nvml.status == "ok"
    fake.lost = {1}
    gpus = nvml.devices(engine_pid=None)
    assert [g["index"] for g in gpus] == [0]
    assert "GPU 1" in nvml.status and "lost" in nvml.status


def test_a_missing_driver_reads_as_no_gpu() -> None:
    fake = FakePynvml()
    fake.init_error = 9
    nvml = Nvml(fake)
    assert nvml.devices(engine_pid=None) == [] and nvml.status == NO_GPU
