"""GGUF inspection: shapes, per-layer bytes, sliding-window layouts, experts, and clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
from gguf import GGUFReader

from vramchat.shared.gguf import GGUFError, inspect_gguf, swa_layout

from gguf_factory import TinyModelSpec, write_tiny_gemma, write_tiny_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("gguf")
    return {
        "gqa-tied-f16": write_tiny_llama(
            directory / "a.gguf", TinyModelSpec(n_layer=4, n_head_kv=2, tied_embeddings=True, f16=True)
        ),
        "moe-q8": write_tiny_llama(
            directory / "b.gguf", TinyModelSpec(n_layer=3, n_embd=64, n_expert=4, n_expert_used=2, quant="Q8_0")
        ),
        "gemma2": write_tiny_gemma(directory / "c.gguf", "gemma2", n_layer=4, window=128),
        "gemma3": write_tiny_gemma(directory / "d.gguf", "gemma3", n_layer=7, window=256),
    }


def test_shape_quantization_and_every_byte_accounted(files: dict[str, Path]) -> None:
    info = inspect_gguf(files["gqa-tied-f16"])
    assert (info.architecture, info.n_layer, info.n_embd, info.n_vocab, info.n_ff) == ("llama", 4, 64, 320, 128)
    assert info.n_head == [4] * 4 and info.n_head_kv == [2] * 4 and (info.head_dim_k, info.head_dim_v) == (16, 16)
    assert info.tied_embeddings and info.has_chat_template and info.n_ctx_train == 2048
    assert info.file_type == "MOSTLY_F16" and set(info.quantization_mix) == {"F16", "F32"}
    total = sum(t.bytes for t in info.tensors)
    assert sum(info.layer_bytes) + info.embedding_bytes + info.output_bytes + info.other_bytes == total
    assert sum(info.quantization_mix.values()) == total
    assert info.output_bytes == 64 * 4  # only output_norm: the output matrix is token_embd
    assert len(set(info.layer_bytes)) == 1 and info.layer_bytes[0] > 0
    assert msgpack.unpackb(msgpack.packb(info.to_dict())) == info.to_dict()


def test_experts_are_counted_in_their_layer(files: dict[str, Path]) -> None:
    info = inspect_gguf(files["moe-q8"])
    assert (info.n_expert, info.n_expert_used, info.file_type) == (4, 2, "MOSTLY_Q8_0")
    experts = [t for t in info.tensors if t.expert]
    assert {t.name.split(".")[2] for t in experts} == {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    assert all(t.shape[2] == 4 for t in experts)
    for layer in range(3):
        assert info.layer_expert_bytes[layer] == sum(t.bytes for t in experts if t.layer == layer)
        assert 0 < info.layer_expert_bytes[layer] < info.layer_bytes[layer]
    assert info.quantization_mix["Q8_0"] > info.quantization_mix["F32"]


def test_sliding_window_layers_follow_llama_cpp(files: dict[str, Path]) -> None:
    gemma2 = inspect_gguf(files["gemma2"])
    assert (gemma2.sliding_window, gemma2.swa_layers) == (128, [0, 2])
    gemma3 = inspect_gguf(files["gemma3"])  # every sixth layer is global
    assert (gemma3.sliding_window, gemma3.swa_layers) == (256, [0, 1, 2, 3, 4, 6])
    assert inspect_gguf(files["gqa-tied-f16"]).swa_layers == []


@pytest.mark.parametrize(
    ("arch", "n_layer", "window", "pattern", "expected"),
    [
        ("gemma2", 5, None, None, (4096, [0, 2, 4])),  # gemma2's default window when the file has none
        ("gemma3", 6, None, None, (None, [])),  # gemma3 without a window: no sliding layers
        ("cohere2", 5, 512, None, (512, [0, 1, 2, 4])),
        ("gemma3", 5, 512, 3, (512, [0, 1, 3, 4])),  # the file's period replaces the default
        ("gpt-oss", 5, 128, [True, False], (128, [0, 2, 4])),  # a flag list, repeated over the layers
        ("gemma3", 3, 512, 0, (512, [0, 1, 2])),  # period 0: every layer slides
        ("llama", 4, 4096, None, (None, [])),  # llama.cpp gives llama no sliding window
    ],
)
def test_swa_layout_rules(
    arch: str, n_layer: int, window: int | None, pattern: object, expected: tuple[int | None, list[int]]
) -> None:
    assert swa_layout(arch, n_layer, window, pattern) == expected


def test_reading_a_vocabulary_is_fast_and_matches_the_gguf_package(demo_model: Path) -> None:
    started = time.perf_counter()
    info = inspect_gguf(demo_model)
    elapsed = time.perf_counter() - started
    started = time.perf_counter()
    reference = GGUFReader(str(demo_model))
    reference_elapsed = time.perf_counter() - started
    assert info.n_vocab == len(reference.fields["tokenizer.ggml.tokens"].data) == 49152
    assert info.n_ctx_train == reference.fields["llama.context_length"].contents()
    assert info.parameters == sum(int(t.n_elements) for t in reference.tensors)
    # Against GGUFReader on the same machine, not a wall-clock bound: ~70 times faster here.
    assert elapsed < reference_elapsed / 10, f"inspecting SmolLM2 took {elapsed:.2f} s, GGUFReader {reference_elapsed:.2f} s"
    assert info.file_type == "MOSTLY_Q4_1" and info.tied_embeddings and 134e6 < info.parameters < 136e6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "does not start with GGUF"),
        (b"PK\x03\x04 a zip file", "does not start with GGUF"),
        (b"GGUF\x03\x00\x00\x00garbage", "truncated"),
    ],
)
def test_unreadable_files_get_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message):
        inspect_gguf(path)


def test_a_truncated_download_says_so(tmp_path: Path, files: dict[str, Path]) -> None:
    data = files["gemma3"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(GGUFError, match=r"truncated .* download it again"):
        inspect_gguf(path)
    with pytest.raises(GGUFError, match="is not a file"):
        inspect_gguf(tmp_path / "missing.gguf")
