"""Telemetry from a real daemon and a real engine, and the sampler's pieces."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from vramchat.daemon.telemetry import AlarmTracker, TelemetrySampler, engine_memory
from vramchat.shared.client import Client, Snapshot
from vramchat.shared.llama_log import parse_load_log

from test_daemon import chat, collect_reply, wait_ready


async def next_telemetry(client: Client) -> dict[str, Any]:
    async for event in client.raw_events():
        if event.topic == "telemetry":
            return event.body
    raise AssertionError("no telemetry")


async def test_ram_and_swap_agree_with_psutil(tiny_daemon: Any) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        await client.subscribe()
        host = (await next_telemetry(client))["host"]
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    assert host["ram_total"] == memory.total and host["swap_total"] == swap.total
    assert abs(host["ram_available"] - memory.available) <= 0.05 * memory.total
    assert abs(host["ram_used"] - memory.used) <= 0.05 * memory.total
    assert abs(host["swap_used"] - swap.used) <= max(0.05 * swap.total, 1 << 20)


async def test_engine_memory_is_present_and_grows_after_loading_a_bigger_model(tiny_daemon: Any, demo_model: Path) -> None:
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


async def test_history_accumulates_and_reaches_a_late_joiner(daemon_factory: Any, models_dir: Path) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), "--telemetry-interval", "0.05")
    await asyncio.sleep(1.0)
    async with Client(daemon.runtime_dir) as late:
        snapshot = await anext(late.stream())
    assert isinstance(snapshot, Snapshot)
    history = snapshot.body["telemetry"]["history"]
    assert len(history) >= 8
    times = [sample["t"] for sample in history]
    assert times == sorted(times) and times[-1] - times[0] > 0.4
    assert snapshot.body["telemetry"]["latest"] == history[-1]


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


async def test_buffer_sizes_reported_at_load_match_the_llama_cpp_log(tiny_daemon: Any, demo_model: Path) -> None:
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


def test_engine_memory_of_a_process_that_mmaps_a_gguf(tmp_path: Path) -> None:
    model = tmp_path / "weights.gguf"
    model.write_bytes(b"\1" * (32 << 20))
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import mmap, sys, time\n"
         f"f = open({str(model)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
         "s = sum(m[i] for i in range(0, len(m), 4096)); buf = bytearray(16 << 20)\n"
         "print('ready', flush=True); time.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout and child.stdout.readline().strip() == "ready"
        memory = engine_memory(child.pid)
        assert memory is not None
        assert 31 << 20 <= memory["model_file_resident"] <= 33 << 20
        assert memory["anon_resident"] >= 16 << 20
        assert memory["rss"] >= memory["model_file_resident"] + memory["anon_resident"]
    finally:
        child.kill()
        child.wait()
    assert engine_memory(child.pid) is None  # a vanished process reads as not available


def test_history_ring_drops_samples_older_than_its_window() -> None:
    sampler = TelemetrySampler(history_s=0.3)
    for _ in range(3):
        sampler.sample(engine_pid=None)
    time.sleep(0.4)
    sampler.sample(engine_pid=None)
    assert len(sampler.history()) == 1
    assert sampler.history()[0]["host"]["swap_in_bps"] is not None  # a rate needs two samples


def sample_with(*, swap_in: float | None = 0, gpu_free: int | None = None, available: int = 8 << 30, rss: int = 0) -> dict[str, Any]:
    gpus = [] if gpu_free is None else [{"index": 0, "memory_free": gpu_free}]
    return {"gpus": gpus, "host": {"swap_in_bps": swap_in, "ram_available": available}, "engine": {"rss": rss}}


def test_alarms_fire_once_when_a_condition_starts_and_once_when_it_clears() -> None:
    alarms = AlarmTracker(vram_margin_bytes=1 << 30)
    assert alarms.update(sample_with(swap_in=50 << 20), generating=False, cpu_side_need_bytes=None) == []
    started = alarms.update(sample_with(swap_in=50 << 20), generating=True, cpu_side_need_bytes=None)
    assert [(a["kind"], a["active"]) for a in started] == [("swapping", True)]
    assert "expect minutes per token" in started[0]["message"]
    assert alarms.update(sample_with(swap_in=50 << 20), generating=True, cpu_side_need_bytes=None) == []
    cleared = alarms.update(sample_with(swap_in=0), generating=True, cpu_side_need_bytes=None)
    assert [(a["kind"], a["active"]) for a in cleared] == [("swapping", False)]


@pytest.mark.parametrize(
    ("sample", "need", "kind"),
    [(sample_with(gpu_free=512 << 20), None, "vram_low"), (sample_with(available=1 << 30, rss=1 << 30), 4 << 30, "ram_low")],
)
def test_vram_and_ram_alarms(sample: dict[str, Any], need: int | None, kind: str) -> None:
    changes = AlarmTracker(vram_margin_bytes=1 << 30).update(sample, generating=False, cpu_side_need_bytes=need)
    assert [a["kind"] for a in changes] == [kind]
