"""The NVML wrapper: the real path on this GPU-less machine, and a fake at the pynvml boundary."""

from __future__ import annotations

import shutil

import pynvml
import pytest
from fake_pynvml import FakePynvml

from vramchat.daemon.nvml import NO_GPU, OK, Nvml


def test_real_pynvml_reports_what_this_machine_has_and_does_not_raise() -> None:
    nvml = Nvml()
    gpus = nvml.devices(engine_pid=123)
    if shutil.which("nvidia-smi"):  # a machine with a driver: real readings
        assert gpus and nvml.status == OK and all(g["memory_total"] > 0 for g in gpus)
    else:
        assert gpus == [] and nvml.status == NO_GPU and nvml.detail
        assert nvml.devices(engine_pid=None) == [] and nvml.status == NO_GPU  # initialised once; still no exception


def test_normal_values_and_process_memory_split_by_pid() -> None:
    gpus = Nvml(FakePynvml()).devices(engine_pid=100)
    assert [g["index"] for g in gpus] == [0, 1]
    first = gpus[0]
    assert first["name"] == "NVIDIA GeForce RTX 3000"
    assert (first["memory_total"], first["memory_used"], first["memory_free"]) == (12 << 30, 4 << 30, 8 << 30)
    assert (first["utilization"], first["temperature"], first["power_w"]) == (50, 60, 150.5)
    assert first["memory_bandwidth"] == 936_096_000_000  # 384 bit x 9751 MHz x 2: the RTX 3090's 936 GB/s
    # The engine's 3 GiB apart; others: 1 GiB compute + 256 MiB graphics (pid 300's is withheld).
    assert (first["engine_memory"], first["other_memory"]) == (3 << 30, (1 << 30) + (256 << 20))
    assert {p["pid"]: p["used_memory"] for p in first["processes"]} == {100: 3 << 30, 200: 1 << 30, 300: None, 400: 256 << 20}
    assert first["error"] is None


def test_without_an_engine_every_process_is_another() -> None:
    gpu = Nvml(FakePynvml()).devices(engine_pid=None)[0]
    assert gpu["engine_memory"] is None and gpu["other_memory"] == (4 << 30) + (256 << 20)


def test_nvml_is_initialised_once() -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    for _ in range(3):
        nvml.devices(engine_pid=None)
    assert fake.init_calls == 1 and nvml.status == OK


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_UNKNOWN, pynvml.NVML_ERROR_NO_PERMISSION])
def test_an_error_on_single_fields_makes_only_them_not_available(code: int) -> None:
    fake = FakePynvml()
    fake.failing = dict.fromkeys(("name", "utilization", "temperature", "power", "bandwidth", "processes"), code)
    nvml = Nvml(fake)
    gpu = nvml.devices(engine_pid=100)[0]
    assert nvml.status == OK
    assert gpu["memory_used"] == 4 << 30
    fields = ("name", "utilization", "temperature", "power_w", "memory_bandwidth", "engine_memory", "other_memory", "processes")
    assert {k: gpu[k] for k in fields} == dict.fromkeys(fields)


def test_older_drivers_fall_back_to_the_v2_process_query() -> None:
    fake = FakePynvml()
    fake.missing_symbols = {"compute_v3"}
    gpu = Nvml(fake).devices(engine_pid=100)[0]
    assert (gpu["engine_memory"], gpu["other_memory"]) == (3 << 30, 256 << 20)  # v2 lists only pid 100 here


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_INVALID_ARGUMENT])
def test_a_device_that_disappears_reads_as_not_available_and_comes_back(code: int) -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    assert all(g["error"] is None for g in nvml.devices(engine_pid=None)) and nvml.status == OK
    fake.lost = {1: code}
    gpus = nvml.devices(engine_pid=None)
    assert gpus[0]["memory_used"] == 4 << 30
    lost = gpus[1]
    assert lost["index"] == 1 and lost["name"] == "NVIDIA GeForce RTX 3010"  # still named from before
    assert lost["memory_used"] is None and lost["engine_memory"] is None and lost["error"]
    assert nvml.status.startswith("NVML error: GPU 1:")
    fake.lost = {}
    assert nvml.devices(engine_pid=None)[1]["memory_used"] == 5 << 30 and nvml.status == OK


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, NO_GPU),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, NO_GPU),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "NVML error: "),
    ],
)
def test_a_failed_init_reads_as_no_gpu_or_an_nvml_error(code: int, status: str) -> None:
    fake = FakePynvml()
    fake.init_error = code
    nvml = Nvml(fake)
    assert nvml.devices(engine_pid=None) == [] and nvml.status.startswith(status)
    assert nvml.devices(engine_pid=None) == [] and fake.init_calls == 1


def test_no_devices_reads_as_no_gpu() -> None:
    fake = FakePynvml()
    fake.count = 0
    nvml = Nvml(fake)
    assert nvml.devices(engine_pid=None) == [] and nvml.status == NO_GPU


def test_an_unexpected_exception_in_the_binding_degrades_to_an_error_status() -> None:
    fake = FakePynvml()
    fake.nvmlDeviceGetMemoryInfo = lambda handle: 1 / 0  # type: ignore[method-assign]
    nvml = Nvml(fake)
    assert nvml.devices(engine_pid=None) == [] and nvml.status.startswith("NVML error:")


def test_driver_versions_or_none_where_nvml_cannot_say() -> None:
    class WithDriver(FakePynvml):
        def nvmlSystemGetDriverVersion(self) -> bytes:
            return b"550.54.15"

        def nvmlSystemGetCudaDriverVersion(self) -> int:
            return 12040

    assert Nvml(WithDriver()).driver_versions() == ("550.54.15", "12.4")
    assert Nvml(FakePynvml()).driver_versions() == (None, None)  # a binding without them
    if not shutil.which("nvidia-smi"):
        assert Nvml().driver_versions() == (None, None)  # no driver here
