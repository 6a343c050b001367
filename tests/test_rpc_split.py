"""Several offload devices: llama.cpp's layer split reproduced by the planner, checked against
two real `vramchat rpc-server`s on loopback (issue 12), and the fit to a budget per device.

shared/placement.py is llama.cpp's split in Python; the integration tests hold each device's
logged buffers to the prediction for that device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_rpc import CPU_SERVER, QUESTION, greedy_reply, load, offloading_daemon, report_of, rpc_device

from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.gguf import inspect_gguf
from vramchat.shared.llama_log import LoadReport
from vramchat.shared.load_options import parse_tensor_split, settings_from
from vramchat.shared.load_plan import Machine, device_budgets, fit, plan_load
from vramchat.shared.placement import OffloadDevice, layer_devices
from vramchat.shared.planner import PlanError, PlanSettings, Prediction, predict
from vramchat.shared.units import format_bytes

from gguf_factory import TinyModelSpec, write_tiny_llama
from helpers import DaemonFactory, RpcServer, vramchat_status

GIB, MIB = 1 << 30, 1 << 20
NO_REPACK = PlanSettings(cpu_repack=frozenset())


def rpc(index: int, free: int = 8 * GIB, port: int = 50052) -> OffloadDevice:
    endpoint = f"127.0.0.1:{port + index}"
    return OffloadDevice(f"RPC{index}", "RPC", free=free, total=free, endpoint=endpoint, buffer_name=f"RPC0[{endpoint}]")


CUDA0 = OffloadDevice("CUDA0", "CUDA", free=12 * GIB, total=12 * GIB)


def test_layer_split_follows_llama_cpp() -> None:
    # 8 repeating layers, all offloaded with the output (9): shares 2:1 -> splits 0.667, 1.0.
    where = layer_devices(8, 9, [2.0, 1.0])
    assert where == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    # Whole layer counts as shares give each device exactly that many, the output on the last.
    assert layer_devices(8, 9, [4.0, 5.0]) == [0] * 4 + [1] * 5
    assert layer_devices(29, 10, [3.0, 7.0]) == [None] * 20 + [0] * 3 + [1] * 7
    # A device with no share gets nothing; n_gpu_layers 0 puts everything on the CPU.
    assert layer_devices(4, 5, [0.0, 1.0]) == [1] * 5
    assert layer_devices(4, 0, [1.0, 1.0]) == [None] * 5


def test_two_devices_share_every_term(tmp_path: Path) -> None:
    info = inspect_gguf(write_tiny_llama(tmp_path / "m.gguf", TinyModelSpec(n_layer=6, n_head_kv=2)))
    devices = [rpc(0), rpc(1)]
    row = predict(info, 7, replace(NO_REPACK, tensor_split=(3.0, 4.0)), devices)
    first, second = row.devices
    assert (first.layers, first.output, second.layers, second.output) == (3, False, 3, True)
    assert first.side.weights == sum(info.layer_bytes[:3]) and first.side.kv == second.side.kv > 0
    assert second.side.weights == sum(info.layer_bytes[3:]) + info.output_bytes
    assert first.side.overhead == second.side.overhead == 0  # no CUDA context on an RPC device
    assert row.gpu.total == first.side.total + second.side.total
    assert second.side.compute >= first.side.compute > 0  # the output's device computes the logits too
    # Default: by free memory, as llama.cpp does.
    by_free = predict(info, 7, NO_REPACK, [rpc(0, free=1 * GIB), rpc(1, free=6 * GIB)])
    assert [d.layers + d.output for d in by_free.devices] == [1, 6]


def test_split_mode_and_main_gpu_are_checked_against_the_devices(tmp_path: Path) -> None:
    info = inspect_gguf(write_tiny_llama(tmp_path / "m.gguf", TinyModelSpec(n_layer=4)))
    devices = [rpc(0), CUDA0]
    only = predict(info, 5, replace(NO_REPACK, split_mode="none", main_gpu=1), devices)
    assert [d.device.name for d in only.devices] == ["CUDA0"] and only.devices[0].layers == 4
    assert only.gpu.overhead == 512 * MIB
    with pytest.raises(PlanError, match="main_gpu 2 is not one of this load's devices"):
        predict(info, 5, replace(NO_REPACK, split_mode="none", main_gpu=2), devices)
    with pytest.raises(PlanError, match="RPC0 cannot hold a row split"):
        predict(info, 5, replace(NO_REPACK, split_mode="row"), devices)
    with pytest.raises(PlanError, match="3 shares but this load has 2 offload devices"):
        predict(info, 5, replace(NO_REPACK, tensor_split=(1.0, 1.0, 1.0)), devices)
    with pytest.raises(PlanError, match="at least one above 0"):
        predict(info, 5, replace(NO_REPACK, tensor_split=(0.0, 0.0)), devices)
    with pytest.raises(PlanError, match="split_mode must be one of"):
        settings_from({"split_mode": "diagonal"}, {}, 512)
    with pytest.raises(ValueError, match="shares separated by commas"):
        parse_tensor_split("3;1")
    assert settings_from({}, {"tensor_split": [3, 1], "main_gpu": 1}, 512).tensor_split == (3.0, 1.0)


def test_the_fit_keeps_each_device_within_its_own_budget(tmp_path: Path) -> None:
    info = inspect_gguf(write_tiny_llama(tmp_path / "m.gguf", TinyModelSpec(n_layer=12, n_embd=128, n_ff=512)))
    devices = [rpc(0), rpc(1)]
    settings = replace(NO_REPACK, n_ctx=512)
    full = predict(info, info.n_layer + 1, replace(settings, tensor_split=(6.0, 7.0)), devices)
    # Budgets that hold about 4 and 5 layers' worth: the fit gives each what fits, and no more.
    per_layer = info.layer_bytes[0] + full.devices[0].side.kv // 6
    last = full.devices[1].side
    budgets = [
        full.devices[0].side.compute + 4 * per_layer + per_layer // 2,
        last.compute + info.output_bytes + 5 * per_layer + 99,
    ]
    fitted = fit(info, budgets, settings, devices)
    assert fitted.tensor_split is not None and 0 < fitted.n_gpu_layers < info.n_layer + 1
    counts = [int(c) for c in fitted.tensor_split]
    assert counts[0] > 0 and counts[1] > 0 and sum(counts) == fitted.n_gpu_layers
    for share, budget in zip(fitted.prediction.devices, budgets, strict=True):
        assert share.side.total <= budget
    # One layer more, however shared, puts a device over its budget: the fit is the most.
    more = fitted.n_gpu_layers + 1
    for first in range(more + 1):
        shares = (float(first), float(more - first))
        bigger = predict(info, more, replace(settings, tensor_split=shares), devices)
        assert any(d.side.total > b for d, b in zip(bigger.devices, budgets, strict=True)), shares
    assert fitted.budgets == {"RPC0": budgets[0], "RPC1": budgets[1]}


def test_budgets_per_device(tmp_path: Path) -> None:
    devices = [rpc(0, free=3 * GIB), rpc(1, free=9 * GIB)]
    assert device_budgets(devices, None) == [2 * GIB, 8 * GIB]
    assert device_budgets(devices, "4GiB") == [1 * GIB, 3 * GIB]  # shared out by free memory
    assert device_budgets(devices, {"RPC1": "1GiB"}) == [2 * GIB, 1 * GIB]
    assert device_budgets(devices, "RPC1=1GiB") == [2 * GIB, 1 * GIB]  # as `--vram-budget` and the dialog take it
    with pytest.raises(PlanError, match="NAME=SIZE"):
        device_budgets(devices, "RPC1=1GiB,4GiB")
    with pytest.raises(PlanError, match="no offload device named CUDA7"):
        device_budgets(devices, {"CUDA7": 1})
    info = inspect_gguf(write_tiny_llama(tmp_path / "m.gguf", TinyModelSpec(n_layer=4)))
    machine = Machine(available_ram=64 * GIB, ram_bandwidth=20e9, devices=tuple(devices))
    plan = plan_load(info, machine, 3, NO_REPACK)
    # llama.cpp would split by free memory again at load: the plan pins what it predicted.
    assert plan.tensor_split == tuple(float(d.layers + d.output) for d in plan.prediction.devices)
    assert plan.to_dict()["prediction"]["devices"][1]["log_name"] == "RPC0[127.0.0.1:50053]"


# --- two real RPC servers ---------------------------------------------------------------


def device_terms(report: LoadReport, device: str) -> dict[str, int]:
    return {kind: report.total(kind, device=device) for kind in ("model", "kv", "compute")}


def assert_matches(predicted: Prediction, report: LoadReport, where: str) -> list[str]:
    """Weights and KV within 1% (or the log's 0.01 MiB rounding), compute within 10%, per device."""
    lines = []
    for share in predicted.devices:
        logged = device_terms(report, share.device.log_name)
        side = share.side
        lines.append(
            f"  {where} {share.device.log_name}: {share.layers} layers{' + output' if share.output else ''}; MiB "
            f"predicted/logged: weights {side.weights / MIB:.2f}/{logged['model'] / MIB:.2f}, "
            f"KV {side.kv / MIB:.2f}/{logged['kv'] / MIB:.2f}, compute {side.compute / MIB:.2f}/{logged['compute'] / MIB:.2f}"
        )
        assert abs(side.weights - logged["model"]) <= max(0.01 * logged["model"], 0.0051 * MIB), lines[-1]
        assert abs(side.kv - logged["kv"]) <= max(0.01 * logged["kv"], 0.0051 * MIB), lines[-1]
        assert abs(side.compute - logged["compute"]) <= max(0.10 * logged["compute"], 0.0051 * MIB), lines[-1]
    cpu = {kind: report.total(kind, gpu=False) for kind in ("model", "kv", "compute")}
    lines.append(
        f"  {where} CPU: MiB predicted/logged: weights {predicted.cpu.weights / MIB:.2f}/{cpu['model'] / MIB:.2f}, "
        f"KV {predicted.cpu.kv / MIB:.2f}/{cpu['kv'] / MIB:.2f}, "
        f"compute {predicted.cpu.compute / MIB:.2f}/{cpu['compute'] / MIB:.2f}"
    )
    assert abs(predicted.cpu.weights - cpu["model"]) <= max(0.01 * cpu["model"], 0.0051 * MIB), lines[-1]
    assert abs(predicted.cpu.kv - cpu["kv"]) <= max(0.01 * cpu["kv"], 0.0051 * MIB), lines[-1]
    assert abs(predicted.cpu.compute - cpu["compute"]) <= 0.10 * cpu["compute"], lines[-1]
    return lines


async def greedy(client: Client) -> str:
    return await greedy_reply(client, QUESTION)


@pytest.mark.demo
async def test_two_rpc_devices_hold_the_shares_predicted(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, demo_model: Path
) -> None:
    servers = [rpc_server_factory(*CPU_SERVER), rpc_server_factory(*CPU_SERVER)]
    daemon = offloading_daemon(daemon_factory, *(s.endpoint for s in servers))
    info = inspect_gguf(demo_model)
    figures = []
    async with Client(daemon.runtime_dir) as client:
        cpu_model = await load(client, {"model": str(demo_model), "n_gpu_layers": 0, "n_ctx": 2048, "rpc_servers": []})
        assert cpu_model["split"]["gpu_bytes"] == 0
        cpu_reply = await greedy(client)
        for layers, shares in ((0, None), (10, [1, 1]), (16, [3, 1]), (info.n_layer + 1, [2, 1]), (info.n_layer + 1, None)):
            body: dict[str, Any] = {"model": str(demo_model), "n_gpu_layers": layers, "n_ctx": 2048}
            if shares:
                body["tensor_split"] = shares
            model = await load(client, body)
            plan = model["plan"]
            devices = [
                OffloadDevice("RPC0", "RPC", endpoint=servers[0].endpoint, buffer_name=f"RPC0[{servers[0].endpoint}]"),
                OffloadDevice("RPC1", "RPC", endpoint=servers[1].endpoint, buffer_name=f"RPC0[{servers[1].endpoint}]"),
            ]
            split = tuple(plan["tensor_split"]) if plan["tensor_split"] else None
            predicted = predict(info, layers, PlanSettings(n_ctx=2048, tensor_split=split), devices)
            # The daemon planned the same thing, each device by its own name.
            assert [(d["log_name"], d["weights"]) for d in plan["prediction"]["devices"]] == [
                (d.device.log_name, d.side.weights) for d in predicted.devices
            ]
            if shares and layers:
                wanted = [s / sum(shares) * layers for s in shares]
                assert [round(w) for w in wanted] == [d.layers + d.output for d in predicted.devices]
            report = report_of(model)
            figures += [f"n_gpu_layers {layers}, tensor_split {shares}:", *assert_matches(predicted, report, "")]
            assert report.offloaded_layers == layers
            assert await greedy(client) == cpu_reply
        # `status` puts each device's predicted and allocated bytes side by side.
        status = vramchat_status(daemon)
        for share in predicted.devices:
            allocated = format_bytes(report.total(device=share.device.log_name))
            line = f"{share.device.name:<6} {share.layers} layers"
            assert any(row.startswith(line) and row.endswith(f"allocated {allocated}") for row in status.splitlines()), status
    print("\n" + "\n".join(figures))


@pytest.mark.demo
async def test_auto_fills_an_rpc_device_to_its_budget_and_no_further(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, demo_model: Path
) -> None:
    server = rpc_server_factory(*CPU_SERVER)
    daemon = offloading_daemon(daemon_factory, server.endpoint)
    device = rpc_device(server.endpoint)
    budget = 150 * MIB  # the compute buffer (~100 MiB at n_ctx 2048) and part of the layers
    async with Client(daemon.runtime_dir) as client:
        model = await load(client, {"model": str(demo_model), "n_gpu_layers": "auto", "n_ctx": 2048, "vram_budget": budget})
        chosen = model["n_gpu_layers"]
        allocated = report_of(model).total(device=device)
        assert 0 < chosen < 31 and allocated <= budget, (chosen, allocated)
        assert model["plan"]["budgets"] == {"RPC0": budget}
        # One layer more is over the budget on the device itself: the fit used all the budget allows.
        more = await load(client, {"model": str(demo_model), "n_gpu_layers": chosen + 1, "n_ctx": 2048})
        assert report_of(more).total(device=device) > budget
        print(f"\nauto with a {budget / MIB:.0f} MiB budget on {device}: {chosen} layers, {allocated / MIB:.2f} MiB allocated")
        with pytest.raises(RequestFailed, match="no offload device named CUDA0"):
            await client.request("load", {"model": str(demo_model), "n_gpu_layers": "auto", "vram_budget": {"CUDA0": "1GiB"}})
        with pytest.raises(RequestFailed, match="split mode row"):
            await client.request("load", {"model": str(demo_model), "n_gpu_layers": 4, "split_mode": "row"})
        assert (await client.request("status"))["model"]["state"] == "ready"  # the refused loads changed nothing
