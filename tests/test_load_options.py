"""Placement beyond a layer count (issue 13): experts kept in RAM, KV cache types and flash
attention, as load options a real daemon passes to llama.cpp, checked against its load log.

The MoE tests put every layer on a real `vramchat rpc-server` on loopback, so "in RAM" and "on
the device" are two different llama.cpp backends even on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_rpc import CPU_SERVER, greedy_reply, load, offloading_daemon, report_of
from test_rpc_split import assert_matches

from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.gguf import inspect_gguf
from vramchat.shared.load_options import cpu_tensor_patterns, parse_flags, settings_from
from vramchat.shared.load_plan import Machine, plan_load
from vramchat.shared.placement import OffloadDevice
from vramchat.shared.planner import PlanError, PlanSettings, predict
from vramchat.shared.speed import CpuSpeed

from gguf_factory import TinyModelSpec, write_tiny_llama
from helpers import DaemonFactory, RpcServer

MIB = 1 << 20
MOE = TinyModelSpec(n_layer=4, n_embd=64, n_ff=96, n_expert=8, n_expert_used=2, n_head_kv=2, seed=3)


def test_expert_patterns_and_options() -> None:
    settings = settings_from({"n_cpu_moe": 2}, {}, 512)
    assert cpu_tensor_patterns(settings, 4) == [
        r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
        r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps",
    ]
    assert cpu_tensor_patterns(settings_from({"n_cpu_moe": "all"}, {}, 512), 4) == [r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    assert parse_flags("--cpu-moe -ctk q8_0 -ctv q8_0 -fa on --mlock --no-mmap -b 256 -ub 128") == {
        "n_cpu_moe": "all",
        "cache_type_k": "q8_0",
        "cache_type_v": "q8_0",
        "flash_attn": "on",
        "n_batch": 256,
        "n_ubatch": 128,
        "use_mlock": True,
        "use_mmap": False,
    }
    with pytest.raises(PlanError, match="needs flash attention"):
        settings_from({"cache_type_v": "q8_0"}, {}, 512)
    with pytest.raises(PlanError, match="n_ubatch 1024 is above n_batch 512"):
        settings_from({"n_ubatch": 1024}, {}, 512)
    with pytest.raises(PlanError, match="cache_type_k must be one of"):
        settings_from({"cache_type_k": "q3_k"}, {}, 512)
    with pytest.raises(PlanError, match="flash_attn must be one of"):
        settings_from({"flash_attn": "sometimes"}, {}, 512)


def test_experts_in_ram_move_bytes_from_the_device_to_the_cpu(tmp_path: Path) -> None:
    info = inspect_gguf(write_tiny_llama(tmp_path / "moe.gguf", MOE))
    device = [OffloadDevice("RPC0", "RPC", endpoint="127.0.0.1:1", buffer_name="RPC0[127.0.0.1:1]")]
    everything = predict(info, 5, PlanSettings(cpu_repack=frozenset()), device)
    two = predict(info, 5, PlanSettings(cpu_repack=frozenset(), n_cpu_moe=2), device)
    experts_0_1 = info.layer_expert_bytes[0] + info.layer_expert_bytes[1]
    assert everything.gpu.weights - two.gpu.weights == experts_0_1 > 0
    assert two.cpu_expert_layers == 2 and everything.cpu_expert_layers == 0
    # Per token the CPU now reads the experts those two layers use: 2 of 8.
    assert two.cpu_bytes_per_token - everything.cpu_bytes_per_token == pytest.approx(experts_0_1 * 2 / 8, abs=8)


async def greedy(client: Client) -> str:
    return await greedy_reply(client, "hello there")


@pytest.fixture
def moe_model(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "moe.gguf", MOE)


@pytest.mark.parametrize("experts", [{"n_cpu_moe": "all"}, {"n_cpu_moe": 2}], ids=["cpu-moe", "n-cpu-moe-2"])
async def test_experts_stay_in_ram_with_every_layer_on_an_rpc_device(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, moe_model: Path, experts: dict[str, Any]
) -> None:
    server = rpc_server_factory(*CPU_SERVER)
    daemon = offloading_daemon(daemon_factory, server.endpoint, extra=("--models-dir", str(moe_model.parent)))
    info = inspect_gguf(moe_model)
    device = OffloadDevice("RPC0", "RPC", endpoint=server.endpoint, buffer_name=f"RPC0[{server.endpoint}]")
    async with Client(daemon.runtime_dir) as client:
        await load(client, {"model": str(moe_model), "n_gpu_layers": 0, "n_ctx": 512, "rpc_servers": []})
        cpu_reply = await greedy(client)
        model = await load(client, {"model": str(moe_model), "n_gpu_layers": info.n_layer + 1, "n_ctx": 512, **experts})
        settings = settings_from(experts, {}, 512)
        predicted = predict(info, info.n_layer + 1, settings, [device])
        assert model["plan"]["prediction"]["cpu"]["weights"] == predicted.cpu.weights
        report = report_of(model)
        print("\n" + "\n".join(assert_matches(predicted, report, str(experts))))
        assert predicted.cpu.weights > info.layer_expert_bytes[0]  # the experts really are on the CPU side
        assert await greedy(client) == cpu_reply


async def test_a_q8_0_cache_with_flash_attention_is_the_size_predicted(daemon_factory: DaemonFactory, demo_model: Path) -> None:
    daemon = daemon_factory("--no-load")
    info = inspect_gguf(demo_model)
    async with Client(daemon.runtime_dir) as client:
        sizes = {}
        for options in ({}, {"cache_type_k": "q8_0", "cache_type_v": "q8_0", "flash_attn": "on"}):
            model = await load(client, {"model": str(demo_model), "n_gpu_layers": 0, "n_ctx": 2048, **options})
            logged = report_of(model).total("kv")
            predicted = predict(info, 0, settings_from(options, {}, 2048)).cpu.kv
            assert abs(predicted - logged) <= max(0.01 * logged, 0.0051 * MIB), (options, predicted, logged)
            sizes[bool(options)] = logged
        assert sizes[True] / sizes[False] == pytest.approx(34 / 64, abs=0.01)  # q8_0: 34 bytes per 32 against 64
        print(f"\nKV at n_ctx 2048: f16 {sizes[False] / MIB:.2f} MiB, q8_0 {sizes[True] / MIB:.2f} MiB")
        chosen = await load(client, {"model": str(demo_model), "n_ctx": 2048, "cache_type_k": "auto", "flash_attn": "on"})
        assert report_of(chosen).total("kv") == sizes[False]  # nothing to fit on this machine: f16 stays
        with pytest.raises(RequestFailed, match="needs flash attention"):
            await client.request("load", {"model": str(demo_model), "cache_type_v": "q4_0"})
        assert (await client.request("status"))["model"]["state"] == "ready"


def test_the_fit_keeps_experts_in_ram_when_that_is_faster(tmp_path: Path) -> None:
    spec = TinyModelSpec(n_layer=8, n_embd=128, n_ff=256, n_expert=8, n_expert_used=2, n_head_kv=2, n_vocab=512)
    info = inspect_gguf(write_tiny_llama(tmp_path / "moe.gguf", spec))
    device = OffloadDevice("RPC0", "RPC", free=64 << 30, total=64 << 30, endpoint="127.0.0.1:1", buffer_name="RPC0[127.0.0.1:1]")
    settings = PlanSettings(n_ctx=512, cpu_repack=frozenset())
    everything = predict(info, info.n_layer + 1, settings, [device])
    budget = everything.gpu.total - info.layer_expert_bytes[0] * 3  # room for all but ~3 layers' experts
    machine = Machine(available_ram=64 << 30, ram_bandwidth=20e9, cpu_speed=CpuSpeed(1e11, 2), devices=(device,))
    plan = plan_load(info, machine, "auto", settings, vram_budget=budget)
    in_ram = plan.settings.n_cpu_moe
    assert plan.n_gpu_layers == info.n_layer + 1 and in_ram is not None and 0 < in_ram < info.n_layer
    assert plan.prediction.gpu.total <= budget
    # As few layers' experts in RAM as fit: one fewer would not.
    fewer = predict(info, info.n_layer + 1, replace(settings, n_cpu_moe=in_ram - 1), [device])
    assert fewer.gpu.total > budget
    reason = plan.to_dict()["fit"]
    assert reason.startswith(f"experts of layers 0-{in_ram - 1} in RAM, everything else on RPC0") and (
        "a layer split would give" in reason
    )
    layer_split = plan_load(info, machine, "auto", replace(settings, n_cpu_moe=0), vram_budget=budget)
    assert layer_split.n_gpu_layers < info.n_layer + 1
    assert (plan.prediction.tokens_per_s or 0) > (layer_split.prediction.tokens_per_s or 0) > 0
    # A dense model has no experts to move: the layer split it is.
    dense = inspect_gguf(write_tiny_llama(tmp_path / "dense.gguf", TinyModelSpec(n_layer=8)))
    assert plan_load(dense, machine, "auto", settings, vram_budget=budget).settings.n_cpu_moe is None


async def test_flash_attention_auto_is_llama_cpps_choice(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    """Llama() takes only on or off; "auto" reaches llama.cpp, which turns it on for the CPU: the
    compute buffer is flash attention's, a fifth of the one without (tiny model, n_ctx 1024)."""
    daemon = daemon_factory("--no-load")
    tiny = models_dir / "tiny.gguf"
    info = inspect_gguf(tiny)
    async with Client(daemon.runtime_dir) as client:
        logged = {}
        for mode in ("off", "auto"):
            model = await load(client, {"model": str(tiny), "n_gpu_layers": 0, "n_ctx": 1024, "flash_attn": mode})
            logged[mode] = report_of(model).total("compute")
        on = predict(info, 0, PlanSettings(n_ctx=1024, flash_attn=True)).cpu.compute
        off = predict(info, 0, PlanSettings(n_ctx=1024)).cpu.compute
        assert abs(logged["auto"] - on) <= 0.10 * logged["auto"] and abs(logged["off"] - off) <= 0.10 * logged["off"], logged


def test_the_fit_chooses_the_most_precise_kv_cache_that_lets_every_layer_fit(tmp_path: Path) -> None:
    info = inspect_gguf(write_tiny_llama(tmp_path / "m.gguf", TinyModelSpec(n_layer=8, n_embd=128, n_ctx_train=32768)))
    device = OffloadDevice("RPC0", "RPC", free=64 << 30, total=64 << 30, endpoint="127.0.0.1:1", buffer_name="RPC0[127.0.0.1:1]")
    machine = Machine(available_ram=64 << 30, ram_bandwidth=20e9, cpu_speed=CpuSpeed(1e11, 2), devices=(device,))
    base = PlanSettings(n_ctx=16384, flash_attn=True, cpu_repack=frozenset())
    at = {
        kv: predict(info, info.n_layer + 1, replace(base, cache_type_k=kv, cache_type_v=kv), [device]).gpu.total
        for kv in ("f16", "q8_0")
    }
    budget = (at["f16"] + at["q8_0"]) // 2  # q8_0 fits every layer, f16 does not
    plan = plan_load(info, machine, "auto", replace(base, cache_type_k="auto", cache_type_v="auto"), vram_budget=budget)
    assert (plan.settings.cache_type_k, plan.settings.cache_type_v) == ("q8_0", "q8_0")
    assert plan.n_gpu_layers == info.n_layer + 1 and plan.prediction.gpu.total <= budget
    assert "KV cache q8_0/q8_0: every layer fits; at f16/f16, " in plan.to_dict()["fit"]
    # With room for f16, f16 it is; without flash attention only K is quantized.
    roomy = plan_load(info, machine, "auto", replace(base, cache_type_k="auto", cache_type_v="auto"), vram_budget=at["f16"])
    assert roomy.settings.cache_type_k == "f16"
    no_fa = replace(base, flash_attn=False, cache_type_k="auto", cache_type_v="auto")
    assert plan_load(info, machine, "auto", no_fa, vram_budget=budget).settings.cache_type_v == "f16"
    assert settings_from({"cache_type_k": "auto"}, {}, 512).cache_type_k == "auto"
