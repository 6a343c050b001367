"""Plain-text telemetry views (`vramchat status`, `vramchat top`)."""

from __future__ import annotations

from typing import Any

from vramchat.tui.telemetry_view import format_status, format_top, sparkline

SAMPLE: dict[str, Any] = {
    "t": 100.0,
    "gpu_status": "no NVIDIA GPU",
    "gpu_detail": "the NVIDIA driver is not loaded",
    "gpus": [],
    "host": {
        "ram_total": 24 << 30,
        "ram_available": 20 << 30,
        "ram_used": 3 << 30,
        "page_cache": 1 << 30,
        "swap_total": 8 << 30,
        "swap_used": 2 << 30,
        "swap_in_bps": 40 << 20,
        "swap_out_bps": None,
    },
    "engine": {"pid": 7, "rss": 300 << 20, "model_file_resident": 92 << 20, "anon_resident": 150 << 20, "major_faults_ps": 0},
    "generation": {"generating": True, "tokens_per_s": 42.5},
}

GPU = {
    "index": 0,
    "name": "NVIDIA GeForce RTX 3060",
    "memory_total": 12 << 30,
    "memory_used": 11 << 30,
    "memory_free": 1 << 30,
    "utilization": 97,
    "temperature": None,
    "power_w": 170.25,
    "memory_bandwidth": 360_000_000_000,
    "engine_memory": 10 << 30,
    "other_memory": 512 << 20,
    "processes": [],
    "error": None,
}


def test_status_without_a_gpu_says_so_and_why() -> None:
    text = format_status(SAMPLE)
    assert "GPU   no NVIDIA GPU (the NVIDIA driver is not loaded)" in text


def test_status_shows_memory_in_units_and_flags_swapping() -> None:
    text = format_status(SAMPLE, [{"message": "the system is swapping"}])
    assert "RAM   3.00 GiB used of 24.00 GiB, 20.00 GiB available (1.00 GiB page cache)" in text
    assert "swap  2.00 GiB used of 8.00 GiB; in 40.0 MiB/s, out N/A  SWAPPING" in text
    assert "RSS 300.0 MiB = model file 92.0 MiB + anonymous 150.0 MiB" in text
    assert "generating now at 42.5 tok/s" in text and "ALARM the system is swapping" in text
    quiet = format_status({**SAMPLE, "host": {**SAMPLE["host"], "swap_in_bps": 0}})
    assert "SWAPPING" not in quiet and "ALARM" not in quiet


def test_status_shows_a_gpu_with_unavailable_fields_and_a_lost_one() -> None:
    lost = {**dict.fromkeys(GPU), "index": 1, "name": "NVIDIA A2", "error": "GPU is lost"}
    text = format_status({**SAMPLE, "gpu_status": "NVML error: GPU 1: GPU is lost", "gpus": [GPU, lost]})
    assert "GPU0  NVIDIA GeForce RTX 3060: 11.00 GiB used of 12.00 GiB, 1.00 GiB free\n" in text
    assert "      engine 10.00 GiB, others 512.0 MiB; util 97%, N/A, 170 W; 360 GB/s peak\n" in text
    assert "GPU1  NVIDIA A2: not available (GPU is lost)" in text and "NVML error: GPU 1" in text


def test_status_with_the_model_shows_its_split_and_with_no_sample_says_so() -> None:
    model = {
        "name": "qwen.gguf",
        "state": "ready",
        "n_gpu_layers": 20,
        "split": {
            "offloaded_layers": 20,
            "total_layers": 33,
            "buffers": [{"kind": "model", "device": "CUDA0", "bytes": 7 << 30}],
        },
    }
    text = format_status(SAMPLE, model=model)
    assert text.splitlines()[0] == "model qwen.gguf (ready), split: 20/33 layers on GPU; model 7.00 GiB on CUDA0"
    assert format_status(None) == "memory: no sample yet"
    assert "engine not running" in format_status({**SAMPLE, "engine": None})


def test_top_fits_the_width_and_draws_each_history() -> None:
    history = [
        {
            **SAMPLE,
            "t": 100.0 + i,
            "gpus": [{**GPU, "memory_used": (i * (12 << 30)) // 299}],
            "host": {**SAMPLE["host"], "ram_used": (i % 25) << 30},
            "generation": {"tokens_per_s": float(i)},
        }
        for i in range(300)
    ]
    screen = format_top(history[-1], history, {"name": "m.gguf", "state": "ready"}, width=60)
    lines = screen.splitlines()
    assert lines[0].startswith("model m.gguf (ready)")
    assert all(len(line) <= 60 for line in lines)
    assert "history, last 5.0 min" in screen
    rows = {
        label: next(line for line in lines if line.startswith(label))
        for label in ("RAM used", "swap used", "swap in", "GPU0 VRAM", "tok/s")
    }
    vram = rows["GPU0 VRAM"][12 : 12 + 35]  # the sparkline's columns, oldest first
    assert vram[0] == "▁" and vram[-1] == "█" and list(vram) == sorted(vram)
    assert rows["GPU0 VRAM"].endswith("12.00 GiB") and rows["tok/s"].endswith("299.0 tok/s")
    assert rows["swap in"].endswith("40.0 MiB/s")


def test_top_without_history_or_model_still_draws() -> None:
    screen = format_top(SAMPLE, [SAMPLE])
    assert "no model" in screen and "history, last 0.0 min" in screen


def test_sparkline_scales_from_zero_to_its_top_and_squeezes_history() -> None:
    assert sparkline([0, 5, 10], 3) == "▁▅█"
    assert sparkline([0, 5, 10], 3, high=20) == "▁▃▅"
    assert sparkline([None, None], 4) == "    "
    assert sparkline([1, 2], 4) == "  ▅█"
    assert sparkline([0] * 50 + [10] * 50, 10) == "▁▁▁▁▁█████"  # each column: the largest of its bucket
