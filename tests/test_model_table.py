"""The models table's columns by width, and quantizations named as model cards name them."""

from __future__ import annotations

from pathlib import Path

from conftest import LONG_MODEL_NAME

from vramchat.shared.gguf import inspect_gguf, quant_name
from vramchat.shared.load_plan import Machine
from vramchat.shared.speed import CpuSpeed
from vramchat.tui import model_table
from vramchat.tui.model_table import COLUMNS, cut, fit, text_table

GIB = 1 << 30


def row(name: str, fits: str = "CPU only") -> dict[str, str]:
    return {"model": name, "arch": "llama", "size": "4.58 GiB", "quant": "Q4_K_M", "layers": "32", "ctx": "131072", "fits": fits}


def keys(fitted: list[tuple[model_table.Column, int]]) -> list[str]:
    return [column.key for column, _ in fitted]


def test_quantization_names_drop_llama_cpps_prefixes(named_models_dir: Path) -> None:
    assert quant_name(inspect_gguf(named_models_dir / LONG_MODEL_NAME).file_type) == "Q4_K_M"
    names = [quant_name(t) for t in ("MOSTLY_Q4_1", "ALL_F32", "MOSTLY_BF16", "GUESSED", None)]
    assert names == ["Q4_1", "F32", "BF16", "?", "?"]


def test_at_80_columns_a_40_character_name_stays_whole_and_optional_columns_go() -> None:
    fitted = fit([row(LONG_MODEL_NAME)], COLUMNS, 80, padding=2)
    assert keys(fitted) == ["model", "size", "quant", "layers", "fits"]  # arch and ctx left out
    widths = {c.key: w for c, w in fitted}
    assert widths["model"] == 40 and sum(w + 2 for w in widths.values()) <= 80
    assert keys(fit([row(LONG_MODEL_NAME)], COLUMNS, 120, padding=2)) == [c.key for c in COLUMNS]  # all of them when wide


def test_a_name_too_long_for_the_required_columns_is_cut_with_an_ellipsis() -> None:
    name = "Very-Long-Model-Name-" * 4 + "Q4_K_M.gguf"
    fitted = {c.key: w for c, w in fit([row(name)], COLUMNS, 80, padding=2)}
    assert set(fitted) == {"model", "size", "quant", "fits"} and sum(w + 2 for w in fitted.values()) == 80
    shown = cut(name, fitted["model"])
    assert shown.endswith("…") and len(shown) == fitted["model"] < len(name)


def test_a_terminal_narrower_than_the_required_columns_keeps_the_most_needed() -> None:
    assert keys(fit([row(LONG_MODEL_NAME)], COLUMNS, 40, padding=2)) == ["model", "size", "quant"]


def test_text_table_aligns_numbers_right_and_fits_the_width(named_models_dir: Path) -> None:
    model = {"name": LONG_MODEL_NAME, "path": str(named_models_dir / LONG_MODEL_NAME), "size_bytes": 5 * GIB, "source": "demo"}
    described = model_table.describe(
        {**model, "loaded": True}, Machine(available_ram=64 * GIB, ram_bandwidth=20e9, cpu_speed=CpuSpeed(1e11, 2)), loaded="* "
    )
    assert (described["model"], described["quant"], described["fits"]) == (f"* {LONG_MODEL_NAME}", "Q4_K_M", "CPU only")
    lines = text_table([described], COLUMNS, 60)
    assert all(len(line) <= 60 for line in lines) and lines[1].startswith("* DeepSeek")
    header, body = lines
    assert header.index("size") + len("size") == body.index("GiB") + len("GiB")  # right-aligned under its label
