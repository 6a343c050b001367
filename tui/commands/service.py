"""`vramchat service install [--system] [--dry-run]`: run vramchatd under systemd.

The unit templates live in the source tree's systemd/ folder, installed as the package data of
vramchat.systemd (pyproject.toml), so a wheel carries them too. Installing renders one with this
environment's `vramchatd` (the one next to the running Python) and writes it where systemd
looks, then reloads systemd and enables the service, when there is a systemd to talk to.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vramchat.shared import paths
from vramchat.shared.units import parse_duration

UNIT_NAME = "vramchatd.service"
TEMPLATES = "vramchat.systemd"  # the package whose data the unit templates are
USER_TEMPLATE = "vramchatd.service"
RPC_TEMPLATE = "vramchat-rpc.service"  # `vramchat rpc-server`, a user unit of its own
SYSTEM_TEMPLATE = "vramchatd-system.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_ACCOUNT = "vramchat"
SYSTEM_HOME = Path("/var/lib/vramchat")
SYSTEM_CONFIG = Path("/etc/vramchat/config.toml")
SYSTEM_RUNTIME_DIR = Path("/run/vramchat")
LINGER_DIR = Path("/var/lib/systemd/linger")
USERADD = [
    "useradd",
    "--system",
    "--user-group",
    "--home-dir",
    str(SYSTEM_HOME),
    "--no-create-home",
    "--shell",
    "/usr/sbin/nologin",
    SYSTEM_ACCOUNT,
]
SYSTEM_CONFIG_TEXT = """\
# vramchatd (system service) settings; every key is optional. See `vramchat --help`.
# /var/lib/vramchat/models is always scanned; add more folders the vramchat account can read:
# model_dirs = ["/srv/models"]
# default_model = "/srv/models/llama-3-70b.Q4_K_M.gguf"
# n_gpu_layers = "auto"
"""
_PLAIN = re.compile(r"[A-Za-z0-9/._+:@~,=-]+")


class ServiceError(Exception):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `service install` to the `vramchat` command line."""
    service = subparsers.add_parser("service", help="run vramchatd as a systemd service")
    actions = service.add_subparsers(title="actions", metavar="ACTION", required=True)
    install = actions.add_parser(
        "install",
        help="write the unit, then enable and start it",
        description="Write a systemd unit that runs this environment's vramchatd, then enable and start it.",
    )
    install.add_argument("--system", action="store_true", help="a system service for the dedicated vramchat account (needs root)")
    install.add_argument(
        "--create-user",
        action="store_true",
        help="with --system: create the vramchat account (useradd --system) if it is missing",
    )
    install.add_argument(
        "--http", metavar="HOST:PORT", help="have the daemon serve the OpenAI-compatible API there (vramchatd --http)"
    )
    install.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="have the daemon unload the model after this long without a request, e.g. 30m (vramchatd --keep-alive)",
    )
    install.add_argument(
        "--rpc-server",
        action="store_true",
        help="install `vramchat rpc-server` (this machine's devices for a vramchatd elsewhere, on loopback) instead",
    )
    install.add_argument("--dry-run", action="store_true", help="print the unit and the commands, change nothing")
    install.set_defaults(handler=run)


@dataclass
class Plan:
    unit_path: Path
    unit_text: str
    systemctl: list[str]  # systemctl and its --user flag, if any
    make_dirs: list[tuple[Path, int]]


def run(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "rpc_server", False):
            if args.system or getattr(args, "http", None) or getattr(args, "keep_alive", None):
                raise ServiceError(
                    "--rpc-server installs a user unit of its own: it takes neither --system, --http nor --keep-alive"
                )
            return install_rpc_server(dry_run=args.dry_run)
        daemon_args = [f"--http={args.http}"] if getattr(args, "http", None) else []
        if keep_alive := getattr(args, "keep_alive", None):
            try:
                parse_duration(keep_alive)
            except ValueError as exc:
                raise ServiceError(f"--keep-alive: {exc}") from None
            daemon_args.append(f"--keep-alive={keep_alive}")
        return install(
            system=args.system, dry_run=args.dry_run, create_user=getattr(args, "create_user", False), daemon_args=daemon_args
        )
    except ServiceError as exc:
        print(f"vramchat service: {exc}", file=sys.stderr)
        return 1


def install(*, system: bool, dry_run: bool, create_user: bool = False, daemon_args: list[str] | None = None) -> int:
    """Write the unit and start it; `daemon_args` go on vramchatd's command line in the unit."""
    vramchatd = Path(sys.executable).with_name("vramchatd")
    if not vramchatd.is_file():
        raise ServiceError(
            f"there is no vramchatd next to {sys.executable}; install vramchat into this environment first (make install)"
        )
    plan = system_plan(vramchatd) if system else user_plan(vramchatd)
    plan.unit_text = with_exec_args(plan.unit_text, daemon_args or [])
    if system and not dry_run and os.geteuid() != 0:
        raise ServiceError(f"a system service needs root: sudo {Path(sys.argv[0]).resolve()} service install --system")
    if system:
        warn_unreachable(vramchatd)
        if not ensure_account(create_user, dry_run):
            return 1

    if dry_run:
        print(f"would write {plan.unit_path}:\n")
        print(plan.unit_text)
        for command in systemctl_commands(plan):
            print("would run:", " ".join(command))
    else:
        for directory, mode in plan.make_dirs:
            directory.mkdir(parents=True, exist_ok=True, mode=mode)
        if system and not SYSTEM_CONFIG.exists():
            SYSTEM_CONFIG.parent.mkdir(parents=True, exist_ok=True)
            SYSTEM_CONFIG.write_text(SYSTEM_CONFIG_TEXT)
            print(f"wrote {SYSTEM_CONFIG}")
        plan.unit_path.parent.mkdir(parents=True, exist_ok=True)
        plan.unit_path.write_text(plan.unit_text)
        print(f"wrote {plan.unit_path}")
        status = start(plan)
        if status:
            return status
    explain_access(system)
    return 0


def install_rpc_server(*, dry_run: bool) -> int:
    """Write the RPC server's user unit and start it, like the daemon's."""
    vramchat = Path(sys.executable).with_name("vramchat")
    if not vramchat.is_file():
        raise ServiceError(f"there is no vramchat next to {sys.executable}; install vramchat into this environment first")
    plan = rpc_server_plan(vramchat)
    if dry_run:
        print(f"would write {plan.unit_path}:\n")
        print(plan.unit_text)
        for command in systemctl_commands(plan):
            print("would run:", " ".join(command))
        return 0
    plan.unit_path.parent.mkdir(parents=True, exist_ok=True)
    plan.unit_path.write_text(plan.unit_text)
    print(f"wrote {plan.unit_path}")
    status = start(plan)
    print("It listens on 127.0.0.1:50052; on the daemon's machine: ssh -N -L 50052:127.0.0.1:50052 THIS-HOST, then "
          "vramchatd --rpc 127.0.0.1:50052 (or rpc_servers in its config)")  # fmt: skip
    return status


def rpc_server_plan(vramchat: Path) -> Plan:
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    text = render_unit(read_template(RPC_TEMPLATE), {"VRAMCHAT": str(vramchat)})
    return Plan(config_home / "systemd" / "user" / RPC_TEMPLATE, text, ["systemctl", "--user"], [])


def user_plan(vramchatd: Path) -> Plan:
    data_dir = paths.data_dir()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    text = render_unit(read_template(USER_TEMPLATE), {"VRAMCHATD": str(vramchatd), "DATA_DIR": str(data_dir)})
    # ProtectHome=read-only: the data dir must exist before the service starts to be writable.
    return Plan(config_home / "systemd" / "user" / UNIT_NAME, text, ["systemctl", "--user"], [(data_dir, 0o700)])


def system_plan(vramchatd: Path) -> Plan:
    text = render_unit(read_template(SYSTEM_TEMPLATE), {"VRAMCHATD": str(vramchatd)})
    return Plan(SYSTEM_UNIT_DIR / UNIT_NAME, text, ["systemctl"], [])


def read_template(name: str) -> str:
    path = paths.package_file(TEMPLATES, name)
    if path is None:
        raise ServiceError(
            f"the unit template {name} is not installed with vramchat ({TEMPLATES}); reinstall it "
            "(`make install` in a checkout, or `pip install` of its wheel)"
        )
    try:
        return path.read_text()
    except OSError as exc:
        raise ServiceError(f"cannot read the unit template {path} ({exc.strerror})") from None


def render_unit(template: str, values: dict[str, str]) -> str:
    """Fill @NAME@ placeholders, quoted for systemd: specifiers (%) everywhere, $ in Exec lines."""
    lines = []
    for line in template.splitlines(keepends=True):
        is_exec = line.startswith("Exec")
        for name, value in values.items():
            line = line.replace(f"@{name}@", systemd_quote(value, is_exec))
        lines.append(line)
    text = "".join(lines)
    if leftover := re.findall(r"@[A-Z_]+@", text):
        raise ServiceError(f"the unit template has unfilled placeholders: {', '.join(sorted(set(leftover)))}")
    return text


def with_exec_args(unit_text: str, args: list[str]) -> str:
    """The unit with `args` appended to its ExecStart= line, each quoted for systemd."""
    quoted = "".join(" " + systemd_quote(arg, exec_line=True) for arg in args)
    return re.sub(r"^(ExecStart=.*)$", lambda line: line.group(1) + quoted, unit_text, count=1, flags=re.MULTILINE)


def systemd_quote(value: str, exec_line: bool) -> str:
    if "\n" in value:
        raise ServiceError(f"cannot put a path with a newline in a unit file: {value!r}")
    if _PLAIN.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if exec_line:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def systemctl_commands(plan: Plan) -> list[list[str]]:
    return [[*plan.systemctl, "daemon-reload"], [*plan.systemctl, "enable", "--now", plan.unit_path.name]]


def systemd_running() -> bool:
    """sd_booted(): false in most containers, where systemctl may exist but has nothing to talk to."""
    return Path("/run/systemd/system").is_dir()


def start(plan: Plan) -> int:
    manual = " ".join(systemctl_commands(plan)[-1])
    if shutil.which("systemctl") is None or not systemd_running():
        print(
            "systemd is not running here (a container, or another init), so the service was not "
            f"enabled. Start it yourself (`vramchatd`, `make daemon` or `vramchat rpc-server`), or run `{manual}` "
            "on a machine booted with systemd."
        )
        return 0
    for command in systemctl_commands(plan):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            print(f"vramchat service: `{' '.join(command)}` failed: {detail}", file=sys.stderr)
            if "--user" in plan.systemctl:
                print(
                    "No user systemd instance reachable? Log in through a normal session (not `su`), "
                    "or enable lingering, then retry.",
                    file=sys.stderr,
                )
            return 1
    unit = plan.unit_path.name
    print(f"enabled and started {unit}; logs: journalctl {'--user ' if '--user' in plan.systemctl else ''}-u {unit}")
    return 0


def ensure_account(create: bool, dry_run: bool) -> bool:
    """Whether the vramchat account exists (or will, with --create-user); explains otherwise."""
    try:
        pwd.getpwnam(SYSTEM_ACCOUNT)
        return True
    except KeyError:
        pass
    command = " ".join(USERADD)
    if not create:
        print(
            f"vramchat service: the {SYSTEM_ACCOUNT} account does not exist. The system service runs as that "
            f"unprivileged account; create it with\n  {command}\nor rerun with --create-user.",
            file=sys.stderr,
        )
        return dry_run
    if dry_run:
        print("would run:", command)
        return True
    result = subprocess.run(USERADD, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"vramchat service: `{command}` failed: {result.stderr.strip()}", file=sys.stderr)
        return False
    print(f"created the system account {SYSTEM_ACCOUNT}")
    return True


def warn_unreachable(vramchatd: Path) -> None:
    """The service account must be able to walk to the venv; a 0700 home stops it."""
    for directory in vramchatd.parents:
        if not stat.S_IMODE(directory.stat().st_mode) & 0o001:
            print(
                f"warning: {directory} is not searchable by other users, so the {SYSTEM_ACCOUNT} account "
                f"cannot run {vramchatd}. Install vramchat somewhere it can reach, such as /opt/vramchat.",
                file=sys.stderr,
            )
            return


def explain_access(system: bool) -> None:
    if system:
        print(
            f"\nTo let a person use it: usermod -aG {SYSTEM_ACCOUNT} NAME (effective at their next login), then\n"
            f"  VRAMCHAT_RUNTIME_DIR={SYSTEM_RUNTIME_DIR} vramchat\n"
            f"Models go in {SYSTEM_HOME}/models or the folders listed in {SYSTEM_CONFIG}."
        )
        return
    user = pwd.getpwuid(os.getuid()).pw_name
    if not (LINGER_DIR / user).exists():
        print(
            "\nThe service stops when your last session ends. To keep it (and the loaded model) "
            f"running after you log out:\n  loginctl enable-linger {user}"
        )
