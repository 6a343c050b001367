"""The memory planner: accuracy against llama.cpp's own figures, the fit, and the swap guard."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import pytest
from gguf_factory import TinyModelSpec, write_tiny_gemma2, write_tiny_llama

from vramchat.shared.gguf import GGUFError, inspect_gguf
from vramchat.shared.llama_log import parse_load_log
from vramchat.shared.paths import demo_model_path
from vramchat.shared.planner import PlanError, PlanSettings, fit, plan_table, predict, swap_check

SHAPES = {
    "tiny": TinyModelSpec(),
    "gqa-tied-f16": TinyModelSpec(n_layer=4, n_head_kv=2, tied_embeddings=True, f16=True),
    "wide-vocab": TinyModelSpec(n_layer=3, n_embd=128, n_head=8, n_head_kv=2, n_ff=256, n_vocab=4000),
}
LOG_RESOLUTION = 0.0051 * (1 << 20)  # llama.cpp prints MiB with two decimals, rounded


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("planner")
    found = {name: write_tiny_llama(directory / f"{name}.gguf", spec) for name, spec in SHAPES.items()}
    found["gemma2-swa"] = write_tiny_gemma2(directory / "gemma2-swa.gguf")
    found["smollm2-q4_1"] = demo_model_path()
    return found


class LlamaLog:
    """llama.cpp's log while a model loads in this process."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._callback = llama_cpp.llama_log_callback(lambda level, text, data: self.lines.append(text.decode()))

    def load(self, path: Path, n_ctx: int) -> str:
        self.lines.clear()
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        model = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_gpu_layers=0, verbose=False)
        del model
        return "".join(self.lines)


@pytest.mark.parametrize("name", [*SHAPES, "gemma2-swa", "smollm2-q4_1"])
@pytest.mark.parametrize("n_ctx", [200, 1024, 4096])
def test_prediction_matches_what_llama_cpp_allocates(model_paths: dict[str, Path], name: str, n_ctx: int) -> None:
    info = inspect_gguf(model_paths[name])
    report = parse_load_log(LlamaLog().load(model_paths[name], n_ctx))
    predicted = predict(info, 0, PlanSettings(n_ctx=n_ctx))
    assert report.n_ctx == predicted.n_ctx
    for kind, value, tolerance in (("model", predicted.cpu.weights, 0.01), ("kv", predicted.cpu.kv, 0.01),
                                   ("output", predicted.cpu.output, 0.01), ("compute", predicted.cpu.compute, 0.10)):
        actual = report.total(kind)
        assert abs(value - actual) <= max(tolerance * actual, LOG_RESOLUTION), (kind, value, actual)
    assert predicted.gpu.total == 0


def test_inspection_reads_shape_quantization_and_layers(model_paths: dict[str, Path]) -> None:
    info = inspect_gguf(model_paths["gqa-tied-f16"])
    assert (info.architecture, info.n_layer, info.n_embd, info.n_vocab) == ("llama", 4, 64, 320)
    assert info.n_head == [4] * 4 and info.n_head_kv == [2] * 4 and info.tied_embeddings
    assert info.file_type == "MOSTLY_F16" and set(info.quantization_mix) == {"F16", "F32"}
    assert sum(info.layer_bytes) + info.embedding_bytes + info.output_bytes == sum(t.bytes for t in info.tensors)
    demo = inspect_gguf(model_paths["smollm2-q4_1"])
    assert demo.has_chat_template and demo.file_type == "MOSTLY_Q4_1" and 134e6 < demo.parameters < 136e6


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"PK\x03\x04 a zip file"])
def test_unreadable_files_get_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        inspect_gguf(path)


def test_layers_move_to_the_gpu_output_first_then_from_the_last_layer(model_paths: dict[str, Path]) -> None:
    info = inspect_gguf(model_paths["tiny"])  # 2 layers
    rows = plan_table(info)
    assert [(r.layers_on_gpu, r.output_on_gpu) for r in rows] == [(0, False), (0, True), (1, True), (2, True)]
    gpu = [r.gpu.weights for r in rows]
    cpu = [r.cpu.weights for r in rows]
    assert gpu == sorted(gpu) and cpu == sorted(cpu, reverse=True)
    assert rows[-1].cpu.weights == info.embedding_bytes  # only the token embedding stays behind
    assert rows[-1].gpu.kv == predict(info, 0).cpu.kv
    with pytest.raises(PlanError, match="between 0 and 3"):
        predict(info, 4)


def test_fit_everything_nothing_and_at_a_layer_boundary(model_paths: dict[str, Path]) -> None:
    info = inspect_gguf(model_paths["wide-vocab"])
    rows = plan_table(info)
    assert fit(info, 1 << 40).n_gpu_layers == info.n_layer + 1 and fit(info, 1 << 40).fits_all
    assert fit(info, 0).n_gpu_layers == 0
    boundary = rows[2].gpu.total
    assert fit(info, boundary).n_gpu_layers == 2
    assert fit(info, boundary - 1).n_gpu_layers == 1


def test_fit_can_choose_the_context_too(model_paths: dict[str, Path]) -> None:
    info = inspect_gguf(model_paths["wide-vocab"])
    budget = predict(info, info.n_layer + 1, PlanSettings(n_ctx=1024)).gpu.total
    fitted = fit(info, budget, fit_ctx=True)
    assert fitted.fits_all and fitted.n_ctx == 1024


def test_swap_guard_refuses_with_numbers_and_ways_out(model_paths: dict[str, Path]) -> None:
    prediction = predict(inspect_gguf(model_paths["smollm2-q4_1"]), 0, PlanSettings(n_ctx=4096))
    assert not swap_check(prediction, 8 << 30).would_swap
    verdict = swap_check(prediction, 100 << 20)
    assert verdict.would_swap and verdict.needed == prediction.cpu.total
    assert "MiB short" in verdict.message and "more layers on the GPU" in verdict.message and "--force" in verdict.message


def test_quantized_v_cache_needs_flash_attention(model_paths: dict[str, Path]) -> None:
    info = inspect_gguf(model_paths["tiny"])
    with pytest.raises(PlanError, match="flash attention"):
        predict(info, 0, PlanSettings(cache_type_v="q8_0"))
    f16 = predict(info, 0, PlanSettings(n_ctx=4096)).cpu.kv
    q8 = predict(info, 0, PlanSettings(n_ctx=4096, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn=True)).cpu.kv
    assert q8 == pytest.approx(f16 * 34 / 64)


def test_sliding_window_layers_are_found_and_sized_by_the_swa_full_setting(model_paths: dict[str, Path]) -> None:
    info = inspect_gguf(model_paths["gemma2-swa"])
    assert info.architecture == "gemma2" and info.sliding_window == 128 and info.swa_layers == [0, 2]
    full = predict(info, 0, PlanSettings(n_ctx=4096)).cpu.kv
    windowed = predict(info, 0, PlanSettings(n_ctx=4096, swa_full=False)).cpu.kv
    # Two of four layers keep pad(128 + 512, 256) = 768 cells instead of 4096.
    assert windowed == full // 2 + full // 2 * 768 // 4096
