"""Devices off the host: a real `vramchat rpc-server` on loopback, a real vramchatd offloading to it
with --rpc, and real llama.cpp on both ends (issue 12).

The RPC server serves this machine's CPU when it has no GPU, so the offload device is real
llama.cpp RPC either way: layers, KV cache and compute buffers cross a TCP connection.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.config import Config, ConfigError
from vramchat.shared.gguf import inspect_gguf
from vramchat.shared.llama_log import BufferSize, LoadReport, parse_load_log
from vramchat.shared.planner import PlanSettings, predict
from vramchat.shared.rpc_endpoints import EndpointError, parse_endpoint
from vramchat.tui.commands import rpc_server as rpc_cmd

from helpers import DaemonFactory, DaemonProcess, RpcServer, chat, collect_reply, free_port, parse_unit, until

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "systemd" / "vramchat-rpc.service"
VRAMCHAT = [sys.executable, "-m", "vramchat.tui.cli"]
GREEDY = {"temperature": 0.0, "max_tokens": 24, "seed": 1}
QUESTION = "What is the capital of France? Answer in English."
# A reply long enough to kill the server under it; it stops at max_tokens or end of generation.
LONG_REPLY = {"temperature": 0.0, "max_tokens": 1500, "seed": 1}
LONG_PROMPT = "Count from 1 to 1000, one number per line."
# The served device, named: on a machine with a GPU the default would serve it, and a GPU's
# arithmetic need not give the CPU's reply token for token.
CPU_SERVER = ("--device", "CPU", "--threads", "1")


def offloading_daemon(daemon_factory: DaemonFactory, *servers: str, extra: tuple[str, ...] = ()) -> DaemonProcess:
    """A daemon without a model whose only offload devices are the RPC servers': a local GPU is
    hidden from its engines, so the RPC devices are all the planner offloads to."""
    daemon = daemon_factory("--no-load", *(arg for server in servers for arg in ("--rpc", server)), *extra, start=False)
    daemon.env["CUDA_VISIBLE_DEVICES"] = ""
    return daemon.start()


def rpc_device(endpoint: str) -> str:
    return f"RPC0[{endpoint}]"  # as llama.cpp names the device's buffers in its load log


def report_of(model: dict[str, Any]) -> LoadReport:
    """The model state's split back as a LoadReport."""
    split = model["split"]
    return LoadReport(buffers=[BufferSize(**b) for b in split["buffers"]], offloaded_layers=split["offloaded_layers"])


async def load(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    model: dict[str, Any] = (await client.request("load", body, timeout=120))["model"]
    return model


async def greedy_reply(client: Client, content: str = QUESTION) -> str:
    await client.subscribe()
    events = client.raw_events()
    request_id, _ = await chat(client, content, GREEDY)
    tokens, final = await collect_reply(events, request_id)
    assert final is not None and final["status"] == "complete", final
    return "".join(tokens)


# --- endpoints, config, command lines ------------------------------------------------------------


@pytest.mark.parametrize("text", ["127.0.0.1", ":50052", "host:0", "host:70000", "host:port", "::1:50052", "a b:1"])
def test_bad_endpoints_are_refused(text: str) -> None:
    with pytest.raises(EndpointError):
        parse_endpoint(text)
    with pytest.raises(ConfigError, match="rpc_servers"):
        Config.from_mapping({"rpc_servers": [text]})


def test_config_rpc_servers() -> None:
    assert Config().rpc_servers == []
    config = Config.from_mapping({"rpc_servers": ["127.0.0.1:50052", "gpu-box:50053", "127.0.0.1:50052"]})
    assert config.rpc_servers == ["127.0.0.1:50052", "gpu-box:50053"]
    with pytest.raises(ConfigError, match="list"):
        Config.from_mapping({"rpc_servers": "127.0.0.1:50052"})


def test_vramchatd_rejects_a_bad_rpc_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vramchat.daemon.cli", "--no-load", "--rpc", "nowhere"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--rpc" in result.stderr and "HOST:PORT" in result.stderr


def rpc_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    rpc_cmd.register(parser.add_subparsers())
    return parser.parse_args(["rpc-server", *argv])


def test_rpc_server_binds_loopback_unless_told_otherwise() -> None:
    assert rpc_args().listen == "127.0.0.1:50052"
    assert rpc_cmd.check(rpc_args()) is None
    refused = rpc_cmd.check(rpc_args("--listen", "0.0.0.0:50052"))
    assert refused and "--insecure-remote" in refused and "ssh -N -L 50052:127.0.0.1:50052" in refused
    assert rpc_cmd.check(rpc_args("--listen", "0.0.0.0:50052", "--insecure-remote")) is None
    argv = rpc_cmd.server_argv(rpc_args("--listen", "0.0.0.0:1", "--insecure-remote", "--device", "CPU", "--threads", "2"))
    assert argv[1:] == [
        "-m",
        "vramchat.daemon.llama.rpc",
        "--listen",
        "0.0.0.0:1",
        "--device",
        "CPU",
        "--threads",
        "2",
        "--insecure-remote",
    ]


def test_rpc_server_command_refuses_a_public_address_and_says_how_to_tunnel() -> None:
    result = subprocess.run([*VRAMCHAT, "rpc-server", "--listen", "0.0.0.0:50052"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "authentication" in result.stderr and "ssh -N -L" in result.stderr
    helped = subprocess.run([*VRAMCHAT, "rpc-server", "--help"], capture_output=True, text=True, timeout=60)
    assert "ssh -N -L 50052:127.0.0.1:50052" in helped.stdout and "--insecure-remote" in helped.stdout


def test_the_daemon_side_server_warns_before_serving_a_public_address() -> None:
    """The module the command execs holds the same rule; with the flag it warns (not run to the bind here)."""
    from vramchat.daemon.llama import rpc

    assert rpc.check_listen("192.0.2.1:50052", insecure_remote=False)
    assert rpc.check_listen("192.0.2.1:50052", insecure_remote=True) is None
    assert rpc.check_listen("localhost:50052", insecure_remote=False) is None
    assert "WITHOUT authentication" in rpc.INSECURE_WARNING


def test_the_server_serves_gpus_else_the_cpu() -> None:
    from vramchat.daemon.llama import rpc

    devices = rpc.local_devices()
    served = [d.name for d in map(rpc.libraries().device, rpc._served_devices(None))]
    gpus = [d.name for d in devices if d.type in ("GPU", "IGPU")]
    assert served == (gpus or ["CPU"])
    with pytest.raises(rpc.RpcError, match="no device named 'NPU9'"):
        rpc._served_devices(["NPU9"])


def test_the_load_log_counts_rpc_devices_as_offload_devices() -> None:
    report = parse_load_log(
        "load_tensors: offloaded 16/31 layers to GPU\n"
        "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n"
        "load_tensors: RPC0[127.0.0.1:50152] model buffer size =    60.40 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =    22.50 MiB\n"
        "llama_kv_cache: RPC0[127.0.0.1:50152] KV buffer size =    22.50 MiB\n"
        "sched_reserve: RPC0[127.0.0.1:50152] compute buffer size =    97.12 MiB\n"
        "sched_reserve:        CPU compute buffer size =    46.38 MiB\n"
    )
    mib = 1 << 20
    device = "RPC0[127.0.0.1:50152]"
    assert report.total("model", device=device) == round(60.40 * mib)
    assert report.total("kv", gpu=True) == round(22.50 * mib)
    assert report.total(gpu=True) == report.total(device=device) == sum(round(m * mib) for m in (60.40, 22.50, 97.12))
    assert report.total(gpu=False) == sum(round(m * mib) for m in (92.10, 22.50, 46.38))


# --- the systemd unit --------------------------------------------------------------------------


def rendered_unit(tmp_path: Path) -> tuple[Path, str]:
    vramchat = tmp_path / "venv" / "bin" / "vramchat"
    vramchat.parent.mkdir(parents=True)
    vramchat.write_text("#!/bin/sh\n")
    vramchat.chmod(0o755)
    text = UNIT.read_text().replace("@VRAMCHAT@", str(vramchat))
    path = tmp_path / "user" / UNIT.name
    path.parent.mkdir()
    path.write_text(text)
    return path, text


def test_rpc_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze is missing: scripts/install-test-tools.sh installs it")
    path, _ = rendered_unit(tmp_path)
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    command = [binary, "--user", "verify", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "vramchat-rpc" in line]
    assert result.returncode == 0 and ours == [], f"{shlex.join(command)}:\n{result.stdout}{result.stderr}"


def test_rpc_unit_serves_loopback_with_arguments_vramchat_accepts(tmp_path: Path) -> None:
    from vramchat.tui.cli import build_parser

    _, text = rendered_unit(tmp_path)
    unit = parse_unit(text)
    assert "@" not in text.split("ExecStart=")[1].splitlines()[0]
    exec_start = shlex.split(unit["Service.ExecStart"][0])
    assert exec_start[0] == str(tmp_path / "venv" / "bin" / "vramchat")
    args = build_parser().parse_args(exec_start[1:])
    assert args.handler is rpc_cmd.run and rpc_cmd.check(args) is None
    assert parse_endpoint(args.listen)[0] == "127.0.0.1" and not args.insecure_remote
    assert unit["Service.Restart"] == ["on-failure"] and unit["Service.NoNewPrivileges"] == ["yes"]
    assert "Service.PrivateDevices" not in unit and "Service.MemoryDenyWriteExecute" not in unit  # the GPU stays reachable
    assert unit["Install.WantedBy"] == ["default.target"]


# --- a real daemon offloading to a real RPC server -----------------------------------------------


@pytest.mark.demo
async def test_layers_on_the_rpc_device_give_the_cpu_reply(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, demo_model: Path
) -> None:
    server = rpc_server_factory(*CPU_SERVER)
    assert "vramchat rpc-server: serving CPU" in server.log() and server.endpoint in server.log()
    daemon = offloading_daemon(daemon_factory, server.endpoint)
    async with Client(daemon.runtime_dir) as client:
        model = await load(client, {"model": str(demo_model), "n_gpu_layers": 16, "n_ctx": 2048})
        report = report_of(model)
        device = rpc_device(server.endpoint)
        assert report.offloaded_layers == 16
        for kind in ("model", "kv", "compute"):
            assert report.total(kind, device=device) > 0, (kind, model["split"])
        assert report.total(gpu=True) == report.total(device=device)  # the only offload device here
        assert [(d["name"], d["endpoint"]) for d in model["rpc_devices"]] == [("RPC0", server.endpoint)]
        assert model["rpc_devices"][0]["memory_total"] > 0
        offloaded = await greedy_reply(client)
        assert "Accepted client connection" in server.log()

        # Telemetry lists the RPC device, read by the engine, with what the model holds there.
        await client.subscribe()
        events = client.raw_events()
        seen = []
        async for event in events:
            if event.topic == "telemetry":
                seen += [d for d in event.body.get("devices") or [] if d["kind"] == "RPC"]
                if len(seen) >= 3:
                    break
        assert {(d["name"], d["endpoint"]) for d in seen} == {("RPC0", server.endpoint)}
        assert all(d["memory_total"] > 0 and 0 < d["memory_free"] <= d["memory_total"] for d in seen)
        assert all(d["allocated"] == report.total(device=device) for d in seen)
        status = subprocess.run(
            [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "status", "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        listed = json.loads(status.stdout)["telemetry"]["devices"]
        assert [d["kind"] for d in listed] == ["RPC", "CPU"] and listed[0]["allocated"] == report.total(device=device)
        text = subprocess.run(
            [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "status"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert f"RPC0  RPC device on {server.endpoint}" in text

        cpu = await load(client, {"model": str(demo_model), "n_gpu_layers": 0, "n_ctx": 2048, "rpc_servers": []})
        assert cpu["rpc_devices"] is None and report_of(cpu).total(gpu=True) == 0
        assert await greedy_reply(client) == offloaded
        assert "Paris" in offloaded


@pytest.mark.demo
async def test_a_server_that_is_down_at_load_gives_a_clear_error(daemon_factory: DaemonFactory, demo_model: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    daemon = offloading_daemon(daemon_factory, endpoint)
    async with Client(daemon.runtime_dir) as client:
        with pytest.raises(RequestFailed) as failed:
            await load(client, {"model": str(demo_model), "n_gpu_layers": 16, "n_ctx": 2048})
        assert failed.value.code == "load_failed"
        message = failed.value.message
        assert endpoint in message and "not answering" in message and "vramchat rpc-server" in message
        assert '"rpc_servers": []' in message
        status = await client.request("status")
        assert status["model"]["state"] == "idle" and status["model"]["engine_pid"] is None
        # Only servers the daemon was configured with: the engine would send them the weights.
        with pytest.raises(RequestFailed, match="not one this daemon is configured with"):
            await load(client, {"model": str(demo_model), "rpc_servers": ["127.0.0.1:1"]})
    assert daemon.process is not None and daemon.process.poll() is None


@pytest.mark.demo
async def test_an_rpc_server_killed_mid_reply_interrupts_only_that_reply(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, demo_model: Path
) -> None:
    server = rpc_server_factory(*CPU_SERVER)
    daemon = offloading_daemon(daemon_factory, server.endpoint)
    async with Client(daemon.runtime_dir) as client:
        await load(client, {"model": str(demo_model), "n_gpu_layers": 16, "n_ctx": 2048})
        await client.subscribe()
        events = client.raw_events()
        request_id, accepted = await chat(client, LONG_PROMPT, LONG_REPLY)
        tokens, _ = await collect_reply(events, request_id, until_tokens=3)
        server.kill()
        _, final = await collect_reply(events, request_id)
        assert final is not None and final["status"] == "interrupted", final
        stored = await client.request("conversation.get", {"id": accepted["conversation"]})
        assert stored["messages"][-1]["status"] == "interrupted"
        assert stored["messages"][-1]["content"].startswith("".join(tokens))  # what was generated is kept

        async def crashed() -> dict[str, Any] | None:
            model: dict[str, Any] = (await client.request("status"))["model"]
            return model if model["state"] == "crashed" else None

        model = await until(crashed, timeout=30, what="the model state says crashed")
        assert "RPC0" in model["error"] and server.endpoint in model["error"] and "stopped answering" in model["error"]
        assert model["reloading"] is False, "a reload would only fail the same way"
        assert daemon.process is not None and daemon.process.poll() is None

        # Without the server, the same daemon loads and answers.
        cpu = await load(client, {"model": str(demo_model), "n_gpu_layers": 0, "n_ctx": 2048, "rpc_servers": []})
        assert cpu["state"] == "ready"
        assert await greedy_reply(client)
    assert "the engine was killed by SIGABRT" in daemon.log()


# --- the planner's "gpu" side against the RPC device's buffers -----------------------------------


@pytest.mark.demo
async def test_planner_weights_match_the_rpc_device_buffers(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, demo_model: Path
) -> None:
    """Within 1%: the RPC device's weights and KV buffers against the planner's gpu side (weights
    asserted as issue 12 asks; KV too, as the planner's accuracy test holds it to 1% on the CPU).
    Compute is only printed (see the report in the test output, `pytest -s`)."""
    server = rpc_server_factory(*CPU_SERVER)
    daemon = offloading_daemon(daemon_factory, server.endpoint)
    info = inspect_gguf(demo_model)
    settings = PlanSettings(n_ctx=2048)  # an RPC device is no local GPU: no compute buffer at n_gpu_layers 0
    device = rpc_device(server.endpoint)
    rows = []
    async with Client(daemon.runtime_dir) as client:
        for layers in (0, 16, info.n_layer + 1):
            model = await load(client, {"model": str(demo_model), "n_gpu_layers": layers, "n_ctx": 2048})
            report = report_of(model)
            predicted = predict(info, layers, settings)
            assert model["plan"]["prediction"]["gpu"]["weights"] == predicted.gpu.weights  # the daemon plans the same
            logged = {kind: report.total(kind, device=device) for kind in ("model", "kv", "compute")}
            rows.append((layers, predicted.gpu, logged, report.total("compute", gpu=False), predicted.cpu.compute))
            if layers == 0:
                assert logged["model"] == predicted.gpu.weights == 0, model["split"]
            else:
                assert abs(predicted.gpu.weights - logged["model"]) <= 0.01 * logged["model"], (layers, predicted.gpu, logged)
            assert abs(predicted.gpu.kv - logged["kv"]) <= max(0.01 * logged["kv"], 0.0051 * (1 << 20)), (layers, logged)
    mib = 1 << 20
    print(f"\nplanner gpu side vs {device} buffers (demo model, n_ctx 2048), MiB predicted / logged:")
    for layers, gpu, logged, cpu_logged, cpu_predicted in rows:
        print(
            f"  n_gpu_layers {layers:2}: weights {gpu.weights / mib:8.2f} / {logged['model'] / mib:8.2f}"
            f"   kv {gpu.kv / mib:7.2f} / {logged['kv'] / mib:7.2f}"
            f"   compute {gpu.compute / mib:7.2f} / {logged['compute'] / mib:7.2f}"
            f"   (CPU compute {cpu_predicted / mib:7.2f} / {cpu_logged / mib:7.2f})"
        )
