"""Plain-text telemetry views."""

from __future__ import annotations

from vramchat.tui.telemetry_view import format_status, format_top, sparkline

SAMPLE = {
    "t": 100.0,
    "gpu_status": "no NVIDIA GPU",
    "gpus": [],
    "host": {"ram_total": 24 << 30, "ram_available": 20 << 30, "ram_used": 3 << 30, "page_cache": 1 << 30,
             "swap_total": 8 << 30, "swap_used": 2 << 30, "swap_in_bps": 40 << 20, "swap_out_bps": None},
    "engine": {"pid": 7, "rss": 300 << 20, "model_file_resident": 92 << 20, "anon_resident": 150 << 20},
    "generation": {"generating": True, "tokens_per_s": 42.5},
}


def test_status_says_no_gpu_flags_swapping_and_shows_units() -> None:
    text = format_status(SAMPLE, [{"message": "the system is swapping"}])
    assert "no NVIDIA GPU" in text and "SWAPPING" in text and "40.0 MiB/s" in text
    assert "3.00 GiB used of 24.00 GiB" in text and "out N/A" in text
    assert "model file resident 92.0 MiB" in text and "42.5 tok/s" in text
    assert "ALARM the system is swapping" in text


def test_top_fits_the_width_and_draws_history() -> None:
    history = [{**SAMPLE, "t": 100.0 + i, "host": {**SAMPLE["host"], "ram_used": (1 + i) << 30}} for i in range(30)]
    screen = format_top(history[-1], history, {"name": "m.gguf", "state": "ready"}, width=60)
    assert all(len(line) <= 60 for line in screen.splitlines())
    assert "▁" in screen and "█" in screen


def test_sparkline_scales_to_its_range() -> None:
    assert sparkline([0, 5, 10], 3) == "▁▄█"
    assert sparkline([None, None], 4) == "    "
