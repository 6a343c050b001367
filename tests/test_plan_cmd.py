"""`vramchat plan` works without a daemon, for this machine or one described by --vram/--ram."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vramchat.tui.cli", "plan", *args], capture_output=True, text=True, timeout=120)


def test_table_marks_the_fit_for_a_given_gpu(models_dir: Path) -> None:
    result = plan(str(models_dir / "tiny.gguf"), "--vram", "12GiB")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.strip()[:1].isdigit() and "B" in line]
    assert len(rows) == 4  # 0..n_layer+1 for 2 layers
    assert "<- fits the budget" in rows[3]
    assert "GPU: weights" in result.stdout and "CPU: weights" in result.stdout


def test_json_and_the_swap_risk_with_little_ram(models_dir: Path) -> None:
    result = plan(str(models_dir / "tiny-gqa.gguf"), "--vram", "0", "--ram", "1MiB", "--ctx", "1024", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fit"]["n_gpu_layers"] == 0 and data["available_ram"] == 1 << 20
    assert data["swap"]["would_swap"] and len(data["table"]) == data["model"]["n_layer"] + 2
    assert data["table"][0]["n_ctx"] == 1024


def test_a_file_that_is_not_a_model_gets_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    result = plan(str(bad))
    assert result.returncode == 2 and "not a readable GGUF" in result.stderr and result.stderr.count("\n") == 1


def test_without_a_gpu_it_says_so_and_plans_for_the_cpu(models_dir: Path, monkeypatch, capsys) -> None:
    import argparse

    from vramchat.shared import speed
    from vramchat.tui.commands import plan as plan_cmd

    monkeypatch.setattr(plan_cmd, "this_machine_vram", lambda: (0, None))
    monkeypatch.setattr(speed, "ram_bandwidth", lambda: 20e9)
    monkeypatch.setattr(speed, "cpu_speed", lambda: speed.CpuSpeed(1e11, 2))
    parser = argparse.ArgumentParser()
    plan_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["plan", str(models_dir / "tiny.gguf"), "--ram", "8GiB"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "no NVIDIA GPU found" in out and "0 GPU layers" in out
    assert "GPU: weights 0 B + KV 0 B + compute 0 B" in out


def test_detail_of_a_chosen_layer_count_and_a_refused_cache(models_dir: Path) -> None:
    result = plan(str(models_dir / "tiny.gguf"), "--vram", "12GiB", "--gpu-layers", "1")
    assert result.returncode == 0, result.stderr
    assert "1 GPU layers (0 of 2 repeating layers + output)" in result.stdout and "overhead 512.0 MiB" in result.stdout
    refused = plan(str(models_dir / "tiny.gguf"), "--cache-type-v", "q8_0")
    assert refused.returncode == 2 and "flash attention" in refused.stderr
