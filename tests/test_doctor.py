"""`vramchat doctor` on this machine, against a real daemon, and the failures it must report."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramchat.shared import __version__, protocol
from vramchat.shared.client import Client
from vramchat.tui import cli
from vramchat.tui.commands import doctor
from vramchat.tui.telemetry_view import NO_GPU

from helpers import DaemonProcess, wait_ready

CPU_FLAGS = doctor.cpu_flags()
HAS_NVIDIA_GPU = Path("/dev/nvidiactl").exists()


def run_doctor(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(runtime_dir), "doctor", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


async def model_loaded(runtime_dir: Path) -> None:
    async with Client(runtime_dir) as client:
        await wait_ready(client)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


@pytest.mark.demo
def test_doctor_reports_this_machines_build_devices_and_daemon(tiny_daemon: DaemonProcess) -> None:
    asyncio.run(model_loaded(tiny_daemon.runtime_dir))  # the report names the loaded model
    result = run_doctor(tiny_daemon.runtime_dir, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    checks = by_name(report)
    assert report["ok"] and report["vramchat"] == __version__
    features = report["probe"]["build"]["features"]
    # The instruction sets this CPU has are compiled in (here: AVX2 and AVX-512).
    assert "AVX2" in features or "avx2" not in CPU_FLAGS
    assert "AVX512" in features or "avx512f" not in CPU_FLAGS
    assert checks["llama.cpp build"]["status"] == "ok" and "AVX2 " in checks["llama.cpp build"]["details"][0]
    assert checks["RPC"]["summary"].startswith("built in")  # scripts/install.sh always adds GGML_RPC
    if not HAS_NVIDIA_GPU:
        offload = checks["offload devices"]
        assert offload["status"] == "warn" and "no GPU and no RPC device" in offload["summary"] and offload["fix"] == NO_GPU
        assert checks["NVIDIA driver"]["summary"].startswith("no NVIDIA GPU")
    assert checks["test decode"]["status"] == "ok" and "SmolLM2" in checks["test decode"]["summary"]
    daemon = checks["daemon"]
    assert daemon["status"] == "ok" and f"vramchat {__version__}" in daemon["summary"]
    assert f"protocol {protocol.PROTOCOL_VERSION}" in daemon["summary"] and "tiny.gguf" in daemon["details"][0]
    assert checks["runtime dir"]["status"] == "ok" and "0700" in checks["runtime dir"]["summary"]


def test_doctor_in_words_without_a_daemon(tmp_path: Path) -> None:
    result = run_doctor(tmp_path / "run", "--no-decode")
    assert result.returncode == 0, result.stdout + result.stderr  # not running is a warning, not a failure
    lines = {line[6:24].strip(): line for line in result.stdout.splitlines() if line[:1] != " "}
    assert lines["daemon"].startswith("warn") and "vramchatd is not running" in lines["daemon"]
    assert "AVX2" in result.stdout or "avx2" not in CPU_FLAGS
    if not HAS_NVIDIA_GPU:
        assert "no GPU and no RPC device" in lines["offload devices"]


async def test_doctor_fails_when_the_daemon_speaks_another_protocol(
    tiny_daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)  # this client, newer
    args = cli.build_parser().parse_args(["--runtime-dir", str(tiny_daemon.runtime_dir), "doctor", "--no-decode"])
    code = await doctor.cmd_doctor(args)
    out = capsys.readouterr().out
    daemon_line = next(line for line in out.splitlines() if line[6:24].strip() == "daemon")
    assert code == 1 and daemon_line.startswith("fail") and "protocol" in out
    assert "install the same vramchat version on both sides" in out


def test_a_config_error_fails_and_is_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "config.toml"  # a file of its own, so even --use-my-config leaves yours alone
    broken.write_text("n_ctx = -5\n")
    monkeypatch.setenv("VRAMCHAT_CONFIG", str(broken))
    assert cli.main(["--runtime-dir", str(tmp_path / "run"), "doctor", "--no-decode", "--json"]) == 1
    config = by_name(json.loads(capsys.readouterr().out))["config"]
    assert config["status"] == "fail" and "n_ctx" in config["summary"] and str(broken) in config["fix"]


def test_a_runtime_dir_others_can_enter_fails(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o755)
    (tmp_path / "run").chmod(0o755)
    check = doctor.check_runtime_dir(tmp_path / "run")
    assert check.status == "fail" and check.fix == f"chmod 700 {tmp_path / 'run'}"
    (tmp_path / "run").chmod(0o700)
    assert doctor.check_runtime_dir(tmp_path / "run").status == "ok"


def test_a_build_that_crashes_while_decoding_fails_with_the_way_to_rebuild() -> None:
    build = {
        "llama_cpp_version": "0.3.36",
        "features": ["AVX", "AVX2"],
        "backends": ["CPU"],
        "devices": [{"name": "CPU", "description": "x", "type": "CPU", "backend": "CPU", "memory_free": 1, "memory_total": 1}],
    }
    probe = {"build": build, "exit": "killed by SIGILL", "stderr": "Illegal instruction"}
    checks = {c.name: c for c in doctor.build_checks(probe, {"avx", "avx2", "avx512f"})}
    assert checks["test decode"].status == "fail" and "SIGILL" in checks["test decode"].summary
    assert checks["test decode"].fix == doctor.REBUILD
    assert checks["llama.cpp build"].status == "warn" and "AVX512" in (checks["llama.cpp build"].fix or "")
    assert checks["RPC"].status == "warn"
