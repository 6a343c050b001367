"""The speed estimate: the compute term, the fixed costs per token, threads, and the cached CPU measurement."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from vramchat.shared import paths, speed
from vramchat.shared.gguf import GGUFInfo, inspect_gguf
from vramchat.shared.paths import demo_model_path
from vramchat.shared.planner import PlanSettings, predict

from gguf_factory import RandomLlamaSpec, TinyModelSpec, write_random_llama, write_tiny_llama

CPU = speed.CpuSpeed(flops_per_thread=1e11, cores=2)
SETTINGS = PlanSettings(n_ctx=1024, cpu_repack=frozenset())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GGUFInfo]:
    root = tmp_path_factory.mktemp("speed")
    small = RandomLlamaSpec(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512)
    return {
        "tiny": inspect_gguf(write_tiny_llama(root / "tiny.gguf")),
        "q4_0": inspect_gguf(write_random_llama(root / "q4_0.gguf", small)),
        "q8_0": inspect_gguf(write_random_llama(root / "q8_0.gguf", RandomLlamaSpec(**{**small.__dict__, "quant": "Q8_0"}))),
        "wide": inspect_gguf(write_random_llama(root / "wide.gguf", RandomLlamaSpec(n_layer=2, n_vocab=512))),
        "moe": inspect_gguf(write_tiny_llama(root / "moe.gguf", TinyModelSpec(n_expert=4, n_expert_used=1, quant="Q8_0"))),
    }


def tok_s(
    info: GGUFInfo, n_gpu_layers: int = 0, cpu: speed.CpuSpeed = CPU, n_threads: int | None = None, ram: float = 2e10
) -> float:
    prediction = predict(info, n_gpu_layers, SETTINGS)
    return speed.estimate_tokens_per_second(prediction, ram, 1e12, info=info, cpu=cpu, n_threads=n_threads)


def test_without_the_cpu_it_is_the_bandwidth_bound(models: dict[str, GGUFInfo]) -> None:
    prediction = predict(models["q4_0"], 0, SETTINGS)
    bound = speed.estimate_tokens_per_second(prediction, 2e10, 1e12)
    assert bound == pytest.approx(2e10 / prediction.cpu_bytes_per_token)
    assert tok_s(models["q4_0"]) < bound


def test_more_compute_per_weight_means_fewer_tokens(models: dict[str, GGUFInfo]) -> None:
    work = speed.cpu_work_per_token(models["q4_0"], [False, False], False)
    q8_work = speed.cpu_work_per_token(models["q8_0"], [False, False], False)
    # The same rows: more than the Q4_0 work, less than its weights' share scaled by the ratio.
    assert work < q8_work < work * speed.WORK_PER_WEIGHT["Q8_0"] / speed.WORK_PER_WEIGHT["Q4_0"]
    assert tok_s(models["q8_0"]) < tok_s(models["q4_0"])
    # A core half as fast: the estimate falls, though less than half, since the fixed costs stay.
    slow = tok_s(models["q4_0"], cpu=speed.CpuSpeed(CPU.flops_per_thread / 2, CPU.cores))
    assert tok_s(models["q4_0"]) / 2 < slow < tok_s(models["q4_0"])


def test_work_counts_only_the_cpu_side_and_the_experts_a_token_uses(models: dict[str, GGUFInfo]) -> None:
    info = models["moe"]  # 1 of 4 experts per token
    one = speed.cpu_work_per_token(info, [False, False], False)
    every = speed.cpu_work_per_token(replace(info, n_expert_used=4), [False, False], False)
    experts = sum(
        t.shape[1] * t.shape[2] * (t.shape[0] * speed.WORK_PER_WEIGHT["Q8_0"] + speed.WORK_PER_ROW)
        for t in info.tensors
        if t.expert
    )
    assert every - one == pytest.approx(experts * 3 / 4)
    assert speed.cpu_work_per_token(info, [False, True], False) < one
    assert speed.cpu_work_per_token(info, [True, True], True) == 0
    assert tok_s(info, n_gpu_layers=info.n_layer + 1) > tok_s(info)


def test_a_tiny_model_is_bound_by_the_fixed_costs(models: dict[str, GGUFInfo]) -> None:
    info = models["tiny"]
    fixed = speed.TOKEN_S + speed.LAYER_S * info.n_layer + speed.VOCAB_S * info.n_vocab
    assert 0.5 / fixed < tok_s(info, n_threads=1) < 1 / fixed
    assert tok_s(info, n_threads=1) < speed.estimate_tokens_per_second(predict(info, 0, SETTINGS), 2e10, 1e12) / 4


def test_threads_divide_the_compute_up_to_the_cores(models: dict[str, GGUFInfo]) -> None:
    info = models["wide"]  # 2048 wide: compute outweighs the threads' meetings
    one, two, four = (tok_s(info, n_threads=n) for n in (1, 2, 4))
    assert two > one  # the compute halves, the threads' meeting costs less than that here
    assert four < two  # only 2 cores: the extra threads add waiting, no compute


@pytest.mark.skipif(demo_model_path() is None, reason="the demo model is not installed")
def test_demo_model_estimate_is_in_its_measured_range() -> None:
    info = inspect_gguf(demo_model_path())  # type: ignore[arg-type]
    # With this machine's figures (28 GB/s, 100 GFLOP/s a thread), the demo model runs at
    # 80 to 120 tok/s on 2 threads and 55 to 85 on one (docs/planner.md); the bound said 283.
    assert 80 < tok_s(info, n_threads=2, ram=2.8e10) < 140
    assert 55 < tok_s(info, n_threads=1, ram=2.8e10) < 110


def test_cpu_speed_is_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "cache_dir", lambda: tmp_path)
    measured = speed.cpu_speed(refresh=True)
    assert 1e8 < measured.flops_per_thread < 1e13 and measured.cores >= 1
    cache = tmp_path / "cpu_speed.json"
    assert json.loads(cache.read_text())["flops_per_thread"] == measured.flops_per_thread
    cache.write_text('{"flops_per_thread": 1234.0}')
    assert speed.cpu_speed().flops_per_thread == 1234.0
    cache.write_text("not json")  # a damaged cache is measured again
    assert speed.cpu_speed().flops_per_thread > 1e8


def test_a_failed_measurement_falls_back_and_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(speed, "MATMUL_PROBE", "raise SystemExit(3)")
    assert speed.cpu_speed(refresh=True).flops_per_thread == speed.DEFAULT_FLOPS_PER_THREAD
    assert not (tmp_path / "cpu_speed.json").exists()
