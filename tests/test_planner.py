"""The planner's arithmetic: layer placement, the fit, the swap guard, cache types and speed.

tests/test_planner_accuracy.py checks the figures against llama.cpp itself.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from vramchat.shared import paths
from vramchat.shared.gguf import GGUFInfo, inspect_gguf
from vramchat.shared.load_plan import DEFAULT_VRAM_MARGIN, Machine, fit, plan_load, swap_check
from vramchat.shared.placement import BACKEND_OVERHEAD_BYTES
from vramchat.shared.planner import PlanError, PlanSettings, plan_table, predict
from vramchat.shared.speed import CpuSpeed, estimate_tokens_per_second, gpu_bandwidth_for, ram_bandwidth

from gguf_factory import TinyModelSpec, write_tiny_gemma, write_tiny_llama

NO_REPACK = PlanSettings(cpu_repack=frozenset())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GGUFInfo]:
    directory = tmp_path_factory.mktemp("planner")
    return {
        "tiny": inspect_gguf(write_tiny_llama(directory / "tiny.gguf", TinyModelSpec())),
        "wide": inspect_gguf(
            write_tiny_llama(
                directory / "wide.gguf", TinyModelSpec(n_layer=6, n_embd=128, n_head=8, n_head_kv=2, n_ff=256, n_vocab=4000)
            )
        ),
        "moe": inspect_gguf(write_tiny_llama(directory / "moe.gguf", TinyModelSpec(n_layer=3, n_expert=4, n_expert_used=1))),
        "q4": inspect_gguf(write_tiny_llama(directory / "q4.gguf", TinyModelSpec(n_embd=128, n_ff=256, quant="Q4_0"))),
        "gemma2": inspect_gguf(write_tiny_gemma(directory / "gemma2.gguf")),
    }


def test_layers_move_to_the_gpu_output_first_then_from_the_last_layer(models: dict[str, GGUFInfo]) -> None:
    info = models["tiny"]  # 2 layers
    rows = plan_table(info, NO_REPACK)
    assert [(r.layers_on_gpu, r.output_on_gpu) for r in rows] == [(0, False), (0, True), (1, True), (2, True)]
    assert rows[1].gpu.weights == info.output_bytes
    assert rows[2].gpu.weights - rows[1].gpu.weights == info.layer_bytes[1]
    assert rows[-1].cpu.weights == info.embedding_bytes  # only the token embedding stays behind
    assert rows[-1].gpu.kv == rows[0].cpu.kv and rows[-1].cpu.kv == 0
    with pytest.raises(PlanError, match="between 0 and 3"):
        predict(info, 4)


def test_the_table_is_monotonic(models: dict[str, GGUFInfo]) -> None:
    rows = plan_table(models["wide"], PlanSettings(n_ctx=8192), ram_bandwidth=20e9, gpu_bandwidth=400e9)
    gpu, cpu = [r.gpu.total for r in rows], [r.cpu.total for r in rows]
    assert gpu == sorted(gpu) and len(set(gpu)) == len(gpu)
    assert cpu[1:] == sorted(cpu[1:], reverse=True)  # from 1 on; at 0 the compute buffer is on the CPU
    speeds = [r.tokens_per_s or 0.0 for r in rows]
    assert speeds == sorted(speeds) and speeds[0] < speeds[-1]
    assert msgpack.unpackb(msgpack.packb([r.to_dict() for r in rows]))[3]["gpu"]["total"] == gpu[3]


def test_fit_everything_nothing_and_at_a_layer_boundary(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]
    rows = plan_table(info)
    everything = fit(info, 1 << 40)
    assert everything.n_gpu_layers == info.n_layer + 1 and everything.fits_all
    nothing = fit(info, 0)
    assert nothing.n_gpu_layers == 0 and not nothing.fits_all and nothing.prediction.gpu.total == 0
    boundary = rows[4].gpu.total
    assert fit(info, boundary).n_gpu_layers == 4
    assert fit(info, boundary - 1).n_gpu_layers == 3
    assert fit(info, BACKEND_OVERHEAD_BYTES["CUDA"]).n_gpu_layers == 0  # the CUDA context alone fills it


def test_fit_can_choose_the_context_too(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]
    budget = predict(info, info.n_layer + 1, PlanSettings(n_ctx=1024)).gpu.total
    fitted = fit(info, budget, fit_ctx=True)
    assert fitted.fits_all and fitted.n_ctx == 1024
    assert fitted.to_dict()["prediction"]["n_ctx"] == 1024


def test_a_gpu_machine_keeps_compute_in_vram_even_with_no_layers(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]
    cpu_only = predict(info, 0, PlanSettings())
    gpu_build = predict(info, 0, PlanSettings(has_gpu=True))
    assert cpu_only.gpu.total == 0
    assert gpu_build.gpu.compute == cpu_only.cpu.compute and gpu_build.gpu.overhead == BACKEND_OVERHEAD_BYTES["CUDA"]
    assert gpu_build.gpu.weights == gpu_build.gpu.kv == 0


def test_swap_guard_refuses_with_numbers_and_ways_out(models: dict[str, GGUFInfo]) -> None:
    prediction = predict(models["wide"], 2, PlanSettings(n_ctx=4096))
    resident = prediction.ram.resident
    assert not swap_check(prediction, resident).would_swap
    verdict = swap_check(prediction, resident - (3 << 20))
    assert verdict.would_swap and verdict.needed == resident
    assert "3.0 MiB short" in verdict.message
    for way in ("more layers on the GPU", "lower the context", "smaller quantization", "--force"):
        assert way in verdict.message
    all_on_gpu = predict(models["wide"], models["wide"].n_layer + 1)
    assert "more layers" not in swap_check(all_on_gpu, 0).message
    assert msgpack.unpackb(msgpack.packb(verdict.to_dict()))["would_swap"] is True


def test_quantized_v_cache_needs_flash_attention(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]  # head size 16: too small for q8_0 blocks of 32
    with pytest.raises(PlanError, match="flash attention"):
        predict(info, 0, PlanSettings(cache_type_v="q8_0"))
    with pytest.raises(PlanError, match="divides by 32"):
        predict(info, 0, PlanSettings(cache_type_k="q8_0"))
    q4 = models["q4"]  # head size 32
    f16 = predict(q4, 0, PlanSettings(n_ctx=4096)).cpu.kv
    q8 = predict(q4, 0, PlanSettings(n_ctx=4096, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn=True)).cpu.kv
    assert q8 == pytest.approx(f16 * 34 / 64)
    with pytest.raises(PlanError, match="unknown KV cache type"):
        PlanSettings(cache_type_k="q3").check()


def test_sliding_window_layers_are_sized_by_the_swa_full_setting(models: dict[str, GGUFInfo]) -> None:
    info = models["gemma2"]  # layers 0 and 2 of 4 slide over 128 tokens
    full = predict(info, 0, PlanSettings(n_ctx=4096)).cpu.kv
    windowed = predict(info, 0, PlanSettings(n_ctx=4096, swa_full=False)).cpu.kv
    # Two of four layers keep pad(128 + 512, 256) = 768 cells instead of 4096.
    assert windowed == full // 2 + full // 2 * 768 // 4096


def test_repacked_weights_leave_the_map_but_still_count(models: dict[str, GGUFInfo]) -> None:
    info = models["q4"]
    mapped = predict(info, 0, NO_REPACK).cpu.weights
    repacked = predict(info, 0, PlanSettings(cpu_repack=frozenset({"Q4_0"}))).cpu.weights
    matrices = sum(t.bytes for t in info.tensors if t.type == "Q4_0" and t.name != "token_embd.weight")
    assert repacked > mapped  # the copies come on top of the mapped span that still holds the norms
    assert repacked <= mapped + matrices


def test_speed_reads_only_the_experts_a_token_uses(models: dict[str, GGUFInfo]) -> None:
    info = models["moe"]  # 1 of 4 experts per token
    row = predict(info, 0)
    experts = sum(info.layer_expert_bytes)
    assert row.cpu_bytes_per_token == sum(info.layer_bytes) - experts * 3 // 4 + info.output_bytes
    assert estimate_tokens_per_second(row, 1e9, 1e12) == pytest.approx(1e9 / row.cpu_bytes_per_token)
    on_gpu = predict(info, info.n_layer + 1)
    assert on_gpu.cpu_bytes_per_token == 0 and estimate_tokens_per_second(on_gpu, 1e9, 1e12) == pytest.approx(
        1e12 / on_gpu.gpu_bytes_per_token
    )


def test_gpu_bandwidth_table_prefers_the_longest_name() -> None:
    assert gpu_bandwidth_for("NVIDIA GeForce RTX 4070 Ti SUPER") == 5.04e11
    assert gpu_bandwidth_for("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_bandwidth_for("Some Future GPU") == gpu_bandwidth_for(None)


def test_ram_bandwidth_is_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "cache_dir", lambda: tmp_path)
    measured = ram_bandwidth(refresh=True)
    assert 1e8 < measured < 1e13
    cache = tmp_path / "ram_bandwidth.json"
    cache.write_text('{"bytes_per_second": 1234.0}')
    assert ram_bandwidth() == 1234.0


def test_settings_defaults_are_llama_cpp_pythons() -> None:
    import inspect

    import llama_cpp

    defaults = inspect.signature(llama_cpp.Llama.__init__).parameters
    settings = replace(PlanSettings(), cpu_repack=frozenset())
    for name in ("n_batch", "n_ubatch", "flash_attn"):  # n_ctx: the engine always passes it
        assert getattr(settings, name) == defaults[name].default, name


def test_plan_load_resolves_auto_to_the_fit_within_free_vram_less_the_margin(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]
    settings = replace(NO_REPACK, n_ctx=2048)
    three_layers = predict(info, 3, replace(settings, has_gpu=True)).gpu.total
    cpu = CpuSpeed(1e11, 2)
    machine = Machine(
        free_vram=three_layers + DEFAULT_VRAM_MARGIN,
        available_ram=1 << 40,
        gpu_name="NVIDIA RTX 4090",
        ram_bandwidth=20e9,
        cpu_speed=cpu,
    )
    plan = plan_load(info, machine, "auto", settings)
    assert plan.budget == three_layers
    assert plan.n_gpu_layers == fit(info, three_layers, replace(settings, has_gpu=True)).n_gpu_layers == 3
    assert plan.settings.has_gpu and plan.prediction.gpu.overhead == BACKEND_OVERHEAD_BYTES["CUDA"]
    expected = estimate_tokens_per_second(plan.prediction, 20e9, 1.008e12, info=info, cpu=cpu)
    assert plan.prediction.tokens_per_s == pytest.approx(expected)
    assert not plan.swap.would_swap
    assert plan.to_dict()["n_gpu_layers"] == 3 and plan.to_dict()["vram_budget"] == three_layers
    assert [row.n_gpu_layers for row in plan.table()] == list(range(info.n_layer + 2))


def test_plan_load_takes_an_explicit_layer_count_and_refuses_one_the_model_lacks(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]
    machine = Machine(free_vram=0, available_ram=1 << 40, ram_bandwidth=20e9)
    assert not machine.has_gpu
    assert plan_load(info, machine, 2, NO_REPACK, vram_budget=0).n_gpu_layers == 2
    assert plan_load(info, machine, "auto", NO_REPACK).n_gpu_layers == 0
    with pytest.raises(PlanError, match=f"choose 0..{info.n_layer + 1}"):
        plan_load(info, machine, info.n_layer + 2, NO_REPACK)


def test_plan_load_judges_the_swap_risk_on_the_machines_ram(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]
    need = predict(info, 0, NO_REPACK).ram.resident
    assert plan_load(info, Machine(available_ram=need, ram_bandwidth=20e9), 0, NO_REPACK).swap.would_swap is False
    short = plan_load(info, Machine(available_ram=need - (1 << 20), ram_bandwidth=20e9), 0, NO_REPACK)
    assert short.swap.would_swap and "would swap" in short.swap.message
