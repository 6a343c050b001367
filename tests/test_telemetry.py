"""Telemetry from a real daemon and a real engine, and the sampler's pieces."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import psutil
import pytest
from fake_pynvml import FakePynvml

from vramchat.daemon.nvml import NO_GPU, Nvml
from vramchat.daemon.telemetry import HOST_KEYS, AlarmTracker, TelemetrySampler, _gguf_resident, engine_memory
from vramchat.shared.client import Client, Snapshot
from vramchat.shared.llama_log import parse_load_log

from helpers import DaemonFactory, DaemonProcess, chat, collect_reply, until, wait_ready, wait_until


async def next_telemetry(client: Client) -> dict[str, Any]:
    async for event in client.raw_events():
        if event.topic == "telemetry":
            return event.body
    raise AssertionError("no telemetry")


async def test_ram_and_swap_agree_with_psutil(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await client.subscribe()
        host = (await next_telemetry(client))["host"]
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    assert host["ram_total"] == memory.total and host["swap_total"] == swap.total
    assert abs(host["ram_available"] - memory.available) <= 0.05 * memory.total
    assert abs(host["ram_used"] - memory.used) <= 0.05 * memory.total
    assert abs(host["swap_used"] - swap.used) <= max(0.05 * swap.total, 1 << 20)


async def test_engine_memory_is_present_and_grows_after_loading_a_bigger_model(
    tiny_daemon: DaemonProcess, demo_model: Path
) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        await client.subscribe()
        small = (await next_telemetry(client))["engine"]
        await client.request("load", {"model": str(demo_model)}, timeout=60)
        events = client.raw_events()
        request_id, _ = await chat(client, "Hi", {"max_tokens": 2})  # touches every weight page
        await collect_reply(events, request_id)
        await next_telemetry(client)
        big = (await next_telemetry(client))["engine"]
    assert small["rss"] > 0 and big["pid"] != small["pid"]
    assert big["rss"] > small["rss"] + (50 << 20)
    # SmolLM2 Q4_1's weights are 92 MiB, and they are mmapped: resident as file pages.
    assert big["model_file_resident"] > 80 << 20


async def test_history_accumulates_and_reaches_a_late_joiner(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), "--telemetry-interval", "0.05")
    async with Client(daemon.runtime_dir) as watcher:  # watched: samples come every 0.05 s
        await watcher.subscribe()
        seen: list[float] = []

        async def enough() -> bool:
            seen.append((await next_telemetry(watcher))["t"])
            return len(seen) >= 8 and seen[-1] - seen[0] > 0.4

        await until(enough, timeout=20, what=lambda: f"8 samples over 0.4 s reach the watcher (got {len(seen)})", interval=0)
    async with Client(daemon.runtime_dir) as late:
        snapshot = await anext(late.stream())
    assert isinstance(snapshot, Snapshot)
    history = snapshot.body["telemetry"]["history"]
    assert len(history) >= 8
    times = [sample["t"] for sample in history]
    assert times == sorted(times) and times[-1] - times[0] > 0.4
    assert snapshot.body["telemetry"]["latest"] == history[-1]


async def test_unwatched_sampling_slows_down_and_a_new_subscriber_gets_a_fresh_sample(
    daemon_factory: DaemonFactory, models_dir: Path
) -> None:
    daemon = daemon_factory(
        "--model", str(models_dir / "tiny.gguf"), "--telemetry-interval", "0.05", "--unwatched-telemetry-interval", "0.5"
    )
    async with Client(daemon.runtime_dir) as client:
        await wait_ready(client)
        unwatched_from = time.time()  # nobody subscribed, nothing generating

        async def samples_since(since: float, count: int) -> list[float] | None:
            times = [s["t"] for s in (await client.request("snapshot"))["telemetry"]["history"] if s["t"] > since]
            return times if len(times) >= count else None

        # 1.5 s of unwatched sampling, between samples (a snapshot request is no subscriber).
        unwatched = await until(lambda: samples_since(unwatched_from, 4), timeout=20, what="4 samples with nobody watching")
        in_window = [t for t in unwatched if t >= unwatched[-1] - 1.5]
        assert 1 <= len(in_window) <= 5, f"{len(in_window)} samples in 1.5 s with nobody watching"
        subscribed_at = time.time()
        sample = await next_telemetry(client)  # subscribes
        assert sample["t"] >= subscribed_at - 0.01 and sample["t"] - subscribed_at < 0.4
        watched = await until(lambda: samples_since(subscribed_at, 8), timeout=20, what="8 samples with a subscriber")
        assert watched[7] - subscribed_at <= 1.0, f"8 samples took {watched[7] - subscribed_at:.2f} s with a subscriber"


def test_an_absurd_telemetry_interval_is_refused_with_the_range() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vramchat.daemon.cli", "--telemetry-interval", "-1"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "between 0.01 and 86400 seconds" in result.stderr


def _llama_log_of_load(model: Path, n_ctx: int) -> str:
    """Load `model` in a separate process with llama.cpp's log captured, as the engine does."""
    script = (
        "import ctypes, sys, llama_cpp\n"
        "lines = []\n"
        "cb = llama_cpp.llama_log_callback(lambda level, text, data: lines.append(text.decode()))\n"
        "llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))\n"
        f"llama_cpp.Llama({str(model)!r}, n_ctx={n_ctx}, n_gpu_layers=0, verbose=False)\n"
        "sys.stdout.write(''.join(lines))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True).stdout


async def test_buffer_sizes_reported_at_load_match_the_llama_cpp_log(tiny_daemon: DaemonProcess, demo_model: Path) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await wait_ready(client)
        loaded = (await client.request("load", {"model": str(demo_model), "n_ctx": 2048}, timeout=60))["model"]
    log = _llama_log_of_load(demo_model, 2048)
    expected = {}
    for line in log.splitlines():
        if "buffer size =" in line:
            device, kind = line.split(":", 1)[1].split()[:2]
            expected[(kind.lower(), device)] = round(float(line.split("=")[1].split()[0]) * 1048576)
    reported = {(b["kind"], b["device"]): b["bytes"] for b in loaded["split"]["buffers"]}
    assert {"model", "kv", "compute"} <= {kind for kind, _ in expected}
    assert reported == expected


def test_llama_log_parser_reads_gpu_lines_and_the_layer_count() -> None:
    report = parse_load_log(
        "load_tensors: offloaded 24/33 layers to GPU\n"
        "load_tensors:        CUDA0 model buffer size =  7020.00 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =  2500.50 MiB\n"
        "llama_kv_cache:      CUDA0 KV buffer size =   768.00 MiB\n"
        "sched_reserve:  CUDA_Host compute buffer size =    24.01 MiB\n"
    )
    assert (report.offloaded_layers, report.total_layers) == (24, 33)
    assert report.total(gpu=True) == round(7788.0 * 1048576)
    assert report.total("model", gpu=False) == round(2500.5 * 1048576)
    assert report.total("compute", gpu=True) == 0  # CUDA_Host is pinned host RAM


# --- the sampler on its own ----------------------------------------------------------------------


class NoGpu(Nvml):
    """An Nvml that reports no GPU without touching the binding (the sampler's tests are about the rest)."""

    def devices(self, engine_pid: int | None) -> list[dict[str, Any]]:
        self.status, self.detail = NO_GPU, "test"
        return []


def test_sampler_ram_and_swap_agree_with_psutil() -> None:
    sample = TelemetrySampler(nvml=NoGpu()).sample(engine_pid=None)
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    host = sample["host"]
    assert host["ram_total"] == memory.total and host["swap_total"] == swap.total
    for ours, theirs, total in [
        (host["ram_available"], memory.available, memory.total),
        (host["ram_used"], memory.used, memory.total),
        (host["swap_used"], swap.used, swap.total),
    ]:
        assert abs(ours - theirs) <= 0.05 * max(total, 1), (ours, theirs)
    assert 0 < host["page_cache"] < memory.total
    assert host["swap_in_bps"] is None and host["swap_out_bps"] is None  # a rate needs two samples


def test_a_sample_is_plain_data_with_every_key_and_passes_generation_through() -> None:
    generation = {"generating": True, "tokens_per_s": 12.5}
    sampler = TelemetrySampler(nvml=Nvml(FakePynvml()))
    sample = sampler.sample(engine_pid=os.getpid(), generation=generation)
    assert msgpack.unpackb(msgpack.packb(sample)) == sample  # plain, msgpack-able data
    assert set(sample) == {"t", "gpu_status", "gpu_detail", "gpus", "host", "engine", "generation"}
    assert set(sample["host"]) == set(HOST_KEYS)
    assert set(sample["gpus"][0]) >= {
        "index",
        "name",
        "memory_total",
        "memory_used",
        "memory_free",
        "utilization",
        "temperature",
        "power_w",
        "engine_memory",
        "other_memory",
    }
    assert sample["gpu_status"] == "ok" and sample["generation"] == generation
    assert set(sample["engine"]) >= {"pid", "rss", "model_file_resident", "anon_resident"}
    assert sampler.history() == [sample] and sampler.latest() is sample


def test_swap_rates_come_from_the_change_of_the_kernel_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    counters = iter([(0, 0), (10 << 20, 1 << 20)])

    def swap_memory() -> Any:
        sin, sout = next(counters)
        return SimpleNamespace(total=8 << 30, used=1 << 30, sin=sin, sout=sout)

    monkeypatch.setattr(psutil, "swap_memory", swap_memory)
    sampler = TelemetrySampler(nvml=NoGpu())
    started = time.monotonic()
    sampler.sample(engine_pid=None)
    first_done = time.monotonic()
    wait_until(lambda: time.monotonic() - first_done >= 0.2, timeout=5, what="0.2 s pass")
    host = sampler.sample(engine_pid=None)["host"]
    elapsed = time.monotonic() - started
    assert (10 << 20) / elapsed <= host["swap_in_bps"] <= (10 << 20) / 0.2
    assert host["swap_out_bps"] == pytest.approx(host["swap_in_bps"] / 10)


def test_a_failing_part_reads_as_not_available_and_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise OSError("no /proc/meminfo")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    sampler = TelemetrySampler(nvml=NoGpu())
    with caplog.at_level(logging.ERROR):
        first, second = sampler.sample(engine_pid=None), sampler.sample(engine_pid=None)
    assert first["host"] == dict.fromkeys(HOST_KEYS) and second["host"] == first["host"]
    assert len([r for r in caplog.records if "host" in r.getMessage()]) == 1


CHILD = """
import mmap, os, sys
f = open(sys.argv[1], 'rb')
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)  # one major fault per page, no readahead
print('mapped', flush=True)
sys.stdin.readline()
s = sum(m[i] for i in range(0, len(m), 4096))
buf = bytearray(b'x' * (48 << 20))
print('touched', flush=True)
sys.stdin.readline()
"""


def test_engine_memory_of_a_real_process_that_mmaps_a_gguf(tmp_path: Path) -> None:
    model = tmp_path / "weights.gguf"
    with model.open("wb") as f:
        f.write(os.urandom(64 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # not cached: reading it faults from disk
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sampler = TelemetrySampler(nvml=NoGpu())
    try:
        assert child.stdout and child.stdin and child.stdout.readline().strip() == "mapped"
        before = sampler.sample(engine_pid=child.pid)["engine"]
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "touched"
        after = sampler.sample(engine_pid=child.pid)["engine"]  # within 10 s: estimated from RssFile
        exact = engine_memory(child.pid)  # the smaps walk
    finally:
        child.kill()
        child.wait()
    assert before["pid"] == after["pid"] == child.pid
    assert before["model_file_resident"] < 4 << 20 and before["major_faults_ps"] is None
    assert exact is not None and 63 << 20 <= exact["model_file_resident"] <= 65 << 20
    assert abs(after["model_file_resident"] - exact["model_file_resident"]) <= 4 << 20
    assert after["anon_resident"] >= before["anon_resident"] + (48 << 20)
    assert after["rss"] >= before["rss"] + (110 << 20)
    assert after["rss"] >= after["model_file_resident"] + after["anon_resident"]
    if _filesystem(tmp_path) == "tmpfs":  # pages of a tmpfs file are never read from disk
        assert after["major_faults_ps"] is not None
    else:
        assert after["major_faults_ps"] > 0


def _filesystem(path: Path) -> str:
    mounts = [p for p in psutil.disk_partitions(all=True) if str(path).startswith(p.mountpoint)]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype


def test_an_engine_that_vanished_reads_as_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    sampler = TelemetrySampler(nvml=NoGpu())
    sample = sampler.sample(engine_pid=child.pid)
    assert sample["engine"] is None and sample["host"]["ram_total"] > 0
    assert engine_memory(child.pid) is None


def test_smaps_parsing_counts_only_gguf_mappings_deleted_or_not() -> None:
    smaps = (
        b"7f00-7f10 r--p 00000000 fd:01 1 /models/a.gguf\nSize: 64 kB\nKernelPageSize: 4 kB\nRss: 40 kB\n"
        b"7f10-7f20 r--p 00000000 fd:01 2 /models/b.gguf (deleted)\nSize: 64 kB\nRss: 8 kB\n"
        b"7f20-7f30 r--p 00000000 fd:01 3 /models/a.gguf.sha256\nSize: 64 kB\nRss: 1000 kB\n"
        b"7f30-7f40 r-xp 00000000 fd:01 4 /usr/lib/libc.so.6\nSize: 64 kB\nRss: 2000 kB\n"
    )
    assert _gguf_resident(smaps) == 48 * 1024


def test_history_ring_drops_samples_older_than_its_window() -> None:
    sampler = TelemetrySampler(history_s=0.3, nvml=NoGpu())
    old = [sampler.sample(engine_pid=None) for _ in range(3)]
    # The sampler stamps samples with time.time(): wait until that clock puts them out of the window.
    wait_until(lambda: time.time() - old[-1]["t"] > 0.3, timeout=5, what="the samples age out of the window")
    kept = sampler.sample(engine_pid=None)
    assert sampler.history() == [kept]


def test_history_ring_is_bounded_when_samples_come_faster_than_the_interval() -> None:
    sampler = TelemetrySampler(interval_s=0.5, history_s=2.0, nvml=NoGpu())
    for _ in range(50):
        sampler.sample(engine_pid=None)
    assert len(sampler.history()) == 10  # twice the 4 samples 2 s hold at 0.5 s, plus 2


# --- alarms --------------------------------------------------------------------------------------


def sample_at(
    t: float,
    *,
    swap_in: float | None = 0,
    gpu_free: int | None = None,
    available: int = 8 << 30,
    rss: int = 0,
    faults: float | None = None,
) -> dict[str, Any]:
    gpus = [] if gpu_free is None else [{"index": 0, "memory_free": gpu_free}]
    return {
        "t": t,
        "gpus": gpus,
        "host": {"swap_in_bps": swap_in, "ram_available": available},
        "engine": {"rss": rss, "model_file_resident": 0, "major_faults_ps": faults},
    }


def kinds(changes: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    return [(a["kind"], a["active"]) for a in changes]


def test_swapping_alarm_starts_once_and_clears_only_after_staying_clear() -> None:
    alarms = AlarmTracker(clear_after_s=5)
    assert alarms.update(sample_at(0, swap_in=50 << 20), generating=False, cpu_side_need_bytes=None) == []  # idle: no alarm
    started = alarms.update(sample_at(1, swap_in=50 << 20), generating=True, cpu_side_need_bytes=None)
    assert kinds(started) == [("swapping", True)] and started[0]["severity"] == "critical"
    assert "expect minutes per token" in started[0]["message"] and "lower n_ctx" in started[0]["message"]
    assert alarms.update(sample_at(2, swap_in=50 << 20), generating=True, cpu_side_need_bytes=None) == []  # no repeat
    assert alarms.update(sample_at(3, swap_in=0), generating=True, cpu_side_need_bytes=None) == []  # a lull in a burst
    assert alarms.update(sample_at(4, swap_in=50 << 20), generating=True, cpu_side_need_bytes=None) == []
    assert alarms.update(sample_at(5, swap_in=0), generating=True, cpu_side_need_bytes=None) == []
    assert (
        alarms.update(sample_at(9, swap_in=(1 << 20) * 0.75), generating=True, cpu_side_need_bytes=None) == []
    )  # inside the band
    assert alarms.update(sample_at(10, swap_in=0), generating=True, cpu_side_need_bytes=None) == []
    cleared = alarms.update(sample_at(15, swap_in=0), generating=True, cpu_side_need_bytes=None)
    assert kinds(cleared) == [("swapping", False)] and "swap" in cleared[0]["message"]
    assert alarms.active == {}


def test_model_pages_re_read_from_disk_count_as_swapping() -> None:
    alarms = AlarmTracker()
    started = alarms.update(sample_at(0, faults=500), generating=True, cpu_side_need_bytes=None)
    assert kinds(started) == [("swapping", True)] and "re-read from disk" in started[0]["message"]


def test_vram_alarm_has_a_band_before_it_clears() -> None:
    alarms = AlarmTracker(clear_after_s=0)
    margin = 1 << 30
    started = alarms.update(
        sample_at(0, gpu_free=512 << 20), generating=False, cpu_side_need_bytes=None, vram_margin_bytes=margin
    )
    assert kinds(started) == [("vram_low", True)] and "fewer GPU layers" in started[0]["message"]
    assert started[0]["severity"] == "warning"
    assert alarms.update(sample_at(1, gpu_free=margin + (100 << 20)), generating=False, cpu_side_need_bytes=None) == []
    cleared = alarms.update(sample_at(2, gpu_free=margin + (300 << 20)), generating=False, cpu_side_need_bytes=None)
    assert kinds(cleared) == [("vram_low", False)]
    assert alarms.update(sample_at(3, gpu_free=margin + (300 << 20)), generating=False, cpu_side_need_bytes=None) == []


def test_ram_alarm_compares_what_the_cpu_side_still_needs_with_what_is_available() -> None:
    alarms = AlarmTracker(clear_after_s=0)
    assert alarms.update(sample_at(0, available=4 << 30, rss=1 << 30), generating=False, cpu_side_need_bytes=4 << 30) == []
    started = alarms.update(sample_at(1, available=2 << 30, rss=1 << 30), generating=False, cpu_side_need_bytes=4 << 30)
    assert kinds(started) == [("ram_low", True)] and "move layers to the GPU" in started[0]["message"]
    assert alarms.update(sample_at(2, available=3 << 30, rss=1 << 30), generating=False, cpu_side_need_bytes=4 << 30) == []
    cleared = alarms.update(sample_at(3, available=4 << 30, rss=1 << 30), generating=False, cpu_side_need_bytes=4 << 30)
    assert kinds(cleared) == [("ram_low", False)]
    assert alarms.update(sample_at(4, available=1 << 30), generating=False, cpu_side_need_bytes=None) == []  # need unknown


def test_devices_lists_each_gpu_rpc_device_and_the_cpu_with_what_the_model_holds_there() -> None:
    from vramchat.daemon.model_state import ModelState
    from vramchat.daemon.monitor import devices_view

    sample = {
        "gpus": [{"index": 0, "name": "NVIDIA RTX 4090", "memory_total": 24 << 30, "memory_free": 20 << 30}],
        "host": {"ram_total": 64 << 30, "ram_available": 40 << 30},
    }
    buffers = [
        {"kind": "model", "device": "CUDA0", "bytes": 3 << 30},
        {"kind": "kv", "device": "CUDA0", "bytes": 1 << 30},
        {"kind": "model", "device": "RPC0[10.0.0.2:50052]", "bytes": 2 << 30},
        {"kind": "model", "device": "CPU_Mapped", "bytes": 5 << 30},
        {"kind": "compute", "device": "CPU", "bytes": 1 << 20},
    ]
    at_load: list[dict[str, Any]] = [
        {
            "name": "RPC0",
            "description": "CPU",
            "memory_total": 8 << 30,
            "memory_free": 6 << 30,
            "endpoint": "10.0.0.2:50052",
            "buffer_name": "RPC0[10.0.0.2:50052]",  # as daemon/llama/rpc.py register_server names it
        }
    ]
    state = ModelState(state="ready", split={"buffers": buffers}, rpc_devices=at_load)
    devices = devices_view(sample, state, None)
    assert [(d["name"], d["kind"], d["allocated"]) for d in devices] == [
        ("CUDA0", "CUDA", 4 << 30),
        ("RPC0", "RPC", 2 << 30),
        ("CPU", "CPU", (5 << 30) + (1 << 20)),
    ]
    assert devices[1]["memory_free"] == 6 << 30 and devices[2]["memory_free"] == 40 << 30
    # The engine's newer reading replaces the one made at load; its CPU device is the host's, listed once.
    newer: list[dict[str, Any]] = [{**at_load[0], "memory_free": 5 << 30}, {"name": "CPU", "description": "x", "endpoint": None}]
    assert [d["memory_free"] for d in devices_view(sample, state, newer) if d["kind"] == "RPC"] == [5 << 30]
    assert [d["kind"] for d in devices_view(sample, state, newer)] == ["CUDA", "RPC", "CPU"]
