"""The unit files: `systemd-analyze verify` on both, rendered as `vramchat service install` does."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from vramchat.tui.commands import service as service_cmd

from helpers import parse_unit


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(f"Service.{key}", [])
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


@pytest.fixture
def rendered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Path, str]]:
    """Both units rendered with an existing vramchatd, each as vramchatd.service in its own dir."""
    monkeypatch.setenv("VRAMCHAT_DATA_DIR", str(tmp_path / "data"))
    vramchatd = tmp_path / "venv" / "bin" / "vramchatd"
    vramchatd.parent.mkdir(parents=True)
    vramchatd.write_text("#!/bin/sh\n")
    vramchatd.chmod(0o755)
    units = {}
    for kind, plan in (("user", service_cmd.user_plan(vramchatd)), ("system", service_cmd.system_plan(vramchatd))):
        path = tmp_path / kind / service_cmd.UNIT_NAME
        path.parent.mkdir()
        path.write_text(plan.unit_text)
        units[kind] = (path, plan.unit_text)
        # As `vramchat service install --http 127.0.0.1:8080` writes it.
        http_text = service_cmd.with_exec_args(plan.unit_text, ["--http=127.0.0.1:8080"])
        http_path = tmp_path / f"{kind}-http" / service_cmd.UNIT_NAME
        http_path.parent.mkdir()
        http_path.write_text(http_text)
        units[f"{kind}-http"] = (http_path, http_text)
    return units


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail(
            "systemd-analyze is missing: install systemd (Debian/Ubuntu: apt-get install systemd) to check the unit files"
        )
    return binary


@pytest.mark.parametrize("kind", ["user", "system", "user-http", "system-http"])
def test_systemd_analyze_verify(kind: str, rendered: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    path, _ = rendered[kind]
    runtime = tmp_path / "xdg-runtime"  # a --user manager needs one, even offline
    runtime.mkdir(mode=0o700)
    command = [systemd_analyze(), *(["--user"] if kind == "user" else []), "verify", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    # Unparsable settings are only warnings ("ignoring"), so any line about our unit fails too.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "vramchatd" in line]
    assert result.returncode == 0 and ours == [], f"{shlex.join(command)}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("kind", ["user", "system"])
def test_common_settings(kind: str, rendered: dict[str, tuple[Path, str]]) -> None:
    unit = parse_unit(rendered[kind][1])
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec").rstrip("s").isdigit()
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "RuntimeDirectory") == "vramchat"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # Each would cut the daemon off the GPU (or CUDA's JIT).
    assert "Service.PrivateDevices" not in unit
    assert "Service.MemoryDenyWriteExecute" not in unit
    assert "Service.ProtectClock" not in unit  # it adds a device allow-list behind your back
    assert one(unit, "ExecStart").split()[0] == str(rendered[kind][0].parent.parent / "venv" / "bin" / "vramchatd")


def test_user_unit(rendered: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    unit = parse_unit(rendered["user"][1])
    assert one(unit, "RuntimeDirectoryMode") == "0700"
    assert f"--data-dir={tmp_path / 'data'}" in one(unit, "ExecStart").split()
    assert one(unit, "ReadWritePaths") == str(tmp_path / "data")
    assert "Service.DeviceAllow" not in unit and "Service.DevicePolicy" not in unit
    assert "Service.User" not in unit
    assert unit["Install.WantedBy"] == ["default.target"]


def test_system_unit(rendered: dict[str, tuple[Path, str]]) -> None:
    unit = parse_unit(rendered["system"][1])
    assert one(unit, "User") == "vramchat" and one(unit, "Group") == "vramchat"
    assert one(unit, "RuntimeDirectoryMode") == "0750"
    assert "--socket-mode=group" in one(unit, "ExecStart").split()
    assert one(unit, "StateDirectory").split()[0] == "vramchat"
    assert one(unit, "DevicePolicy") == "closed"
    allowed = unit["Service.DeviceAllow"]
    for device in ("/dev/nvidiactl rw", "/dev/nvidia0 rw", "/dev/nvidia-uvm rw", "/dev/nvidia-uvm-tools rw", "char-nvidia* rw"):
        assert device in allowed
    assert unit["Install.WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("kind", ["user", "system", "user-http", "system-http"])
def test_execstart_flags_are_ones_vramchatd_accepts(kind: str, rendered: dict[str, tuple[Path, str]]) -> None:
    from vramchat.daemon.cli import build_parser

    arguments = shlex.split(one(parse_unit(rendered[kind][1]), "ExecStart"))[1:]
    try:
        build_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"vramchatd rejects the {kind} unit's ExecStart arguments: {arguments}")


def test_install_subcommand_is_registered() -> None:
    parser = argparse.ArgumentParser()
    service_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["service", "install", "--system", "--dry-run"])
    assert (args.handler, args.system, args.dry_run) == (service_cmd.run, True, True)
