"""`vramchat service install`, run against a temporary HOME and a fake systemctl."""

from __future__ import annotations

import argparse
import os
import pwd
import stat
import sys
from pathlib import Path

import pytest

from vramchat.tui.commands import service as service_cmd

VRAMCHATD = Path(sys.executable).with_name("vramchatd")


def service(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    service_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["service", *argv])
    return args.handler(args)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME with the XDG variables unset, and no lingering for this user."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "VRAMCHAT_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(service_cmd, "LINGER_DIR", tmp_path / "linger")
    return tmp_path


@pytest.fixture
def fake_systemctl(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A systemctl on PATH that records its arguments; systemd counts as running."""
    bin_dir = home / "bin"
    bin_dir.mkdir()
    log = home / "systemctl.log"
    script = bin_dir / "systemctl"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n[ -z "$FAIL_SYSTEMCTL" ] || {{ echo "Failed to connect to bus" >&2; exit 1; }}\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(service_cmd, "systemd_running", lambda: True)
    return log


def test_dry_run_renders_the_user_unit_and_changes_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert service("install", "--dry-run") == 0
    out = capsys.readouterr().out
    unit_path = home / ".config" / "systemd" / "user" / "vramchatd.service"
    data_dir = home / ".local" / "share" / "vramchat"
    assert f"would write {unit_path}:" in out
    assert f"ExecStart={VRAMCHATD} --runtime-dir=%t/vramchat --data-dir={data_dir}\n" in out
    assert f"ReadWritePaths={data_dir}\n" in out
    assert "would run: systemctl --user daemon-reload" in out
    assert "would run: systemctl --user enable --now vramchatd.service" in out
    assert "loginctl enable-linger" in out
    assert list(home.iterdir()) == []


def test_http_goes_on_the_daemons_command_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert service("install", "--dry-run", "--http", "127.0.0.1:8080") == 0
    data_dir = home / ".local" / "share" / "vramchat"
    out = capsys.readouterr().out
    assert f"ExecStart={VRAMCHATD} --runtime-dir=%t/vramchat --data-dir={data_dir} --http=127.0.0.1:8080\n" in out


def test_keep_alive_goes_on_the_daemons_command_line_and_is_checked(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert service("install", "--dry-run", "--keep-alive", "30m") == 0
    assert " --keep-alive=30m\n" in capsys.readouterr().out
    assert service("install", "--dry-run", "--keep-alive", "soon") == 1
    assert "--keep-alive: 'soon' is not a duration" in capsys.readouterr().err


def test_install_writes_the_unit_into_home(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(service_cmd, "systemd_running", lambda: False)
    assert service("install") == 0
    unit_path = home / ".config" / "systemd" / "user" / "vramchatd.service"
    assert unit_path.read_text() == service_cmd.user_plan(VRAMCHATD).unit_text
    data_dir = home / ".local" / "share" / "vramchat"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert "systemd is not running here" in capsys.readouterr().out


def test_install_honours_xdg_config_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "cfg"))
    monkeypatch.setattr(service_cmd, "systemd_running", lambda: False)
    assert service("install") == 0
    assert (home / "cfg" / "systemd" / "user" / "vramchatd.service").is_file()


def test_install_reloads_and_enables(fake_systemctl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert service("install") == 0
    assert fake_systemctl.read_text().splitlines() == ["--user daemon-reload", "--user enable --now vramchatd.service"]
    assert "enabled and started" in capsys.readouterr().out


def test_a_failing_systemctl_is_explained(
    fake_systemctl: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAIL_SYSTEMCTL", "1")
    assert service("install") == 1
    err = capsys.readouterr().err
    assert "Failed to connect to bus" in err
    assert fake_systemctl.read_text().splitlines() == ["--user daemon-reload"]


def test_lingering_users_get_no_linger_hint(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "linger").mkdir()
    (home / "linger" / pwd.getpwuid(os.getuid()).pw_name).touch()
    monkeypatch.setattr(service_cmd, "systemd_running", lambda: False)
    assert service("install") == 0
    assert "enable-linger" not in capsys.readouterr().out


def test_system_dry_run(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_account(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(service_cmd.pwd, "getpwnam", no_account)
    assert service("install", "--system", "--dry-run", "--create-user") == 0
    out = capsys.readouterr().out
    assert "would write /etc/systemd/system/vramchatd.service:" in out
    assert f"ExecStart={VRAMCHATD} --runtime-dir=%t/vramchat --socket-mode=group" in out
    assert "would run: useradd --system --user-group" in out
    assert "would run: systemctl daemon-reload" in out
    assert "would run: systemctl enable --now vramchatd.service" in out
    assert "usermod -aG vramchat" in out


def test_system_install_without_the_account_explains_useradd(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_account(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(service_cmd.pwd, "getpwnam", no_account)
    monkeypatch.setattr(service_cmd.os, "geteuid", lambda: 0)
    monkeypatch.setattr(service_cmd, "SYSTEM_UNIT_DIR", home / "etc-systemd")
    assert service("install", "--system") == 1
    assert "useradd --system" in capsys.readouterr().err
    assert not (home / "etc-systemd").exists()


def test_system_install_needs_root(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(service_cmd.os, "geteuid", lambda: 1000)
    assert service("install", "--system") == 1
    assert "needs root" in capsys.readouterr().err


def test_missing_vramchatd_is_an_error(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(service_cmd.sys, "executable", str(home / "python"))
    assert service("install", "--dry-run") == 1
    assert "no vramchatd next to" in capsys.readouterr().err


def test_odd_paths_are_quoted_for_systemd() -> None:
    text = service_cmd.render_unit(
        "ExecStart=@VRAMCHATD@ --data-dir=@DATA_DIR@\nReadWritePaths=@DATA_DIR@\n",
        {"VRAMCHATD": "/opt/my env/bin/vramchatd", "DATA_DIR": "/data/100%$x"},
    )
    assert text == 'ExecStart="/opt/my env/bin/vramchatd" --data-dir="/data/100%%$$x"\nReadWritePaths="/data/100%%$x"\n'
    with pytest.raises(service_cmd.ServiceError, match="@DATA_DIR@"):
        service_cmd.render_unit("ReadWritePaths=@DATA_DIR@\n", {})


def test_the_rpc_server_installs_as_a_user_unit_of_its_own(
    fake_systemctl: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert service("install", "--rpc-server", "--dry-run") == 0
    out = capsys.readouterr().out
    unit_path = home / ".config" / "systemd" / "user" / "vramchat-rpc.service"
    assert f"would write {unit_path}:" in out and not unit_path.exists()
    assert f"ExecStart={VRAMCHATD.with_name('vramchat')} rpc-server --listen=127.0.0.1:50052\n" in out
    assert "would run: systemctl --user enable --now vramchat-rpc.service" in out
    assert service("install", "--rpc-server") == 0
    assert unit_path.exists() and "@" not in unit_path.read_text().split("ExecStart=")[1].splitlines()[0]
    assert fake_systemctl.read_text().splitlines() == ["--user daemon-reload", "--user enable --now vramchat-rpc.service"]
    assert "enabled and started vramchat-rpc.service" in capsys.readouterr().out
    assert service("install", "--rpc-server", "--system") == 1
    assert "neither --system, --http nor --keep-alive" in capsys.readouterr().err
