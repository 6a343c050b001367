"""vramchat built as a wheel and installed in a fresh venv: its two commands, --version, and the
unit templates it ships as package data (`vramchat service install` reads them).

The llama-cpp-python this venv was built with comes from scripts/install.sh's cache, so nothing
compiles; the other dependencies come from PyPI (through pip's own cache when it has them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from vramchat.shared import __version__

ROOT = Path(__file__).parent.parent
SOURCES = ("pyproject.toml", "README.md", "shared", "daemon", "tui", "systemd")
# Read at import, before each test gets a home of its own: the developer's caches.
CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or str(CACHE_HOME / "pip")


def llama_wheel() -> Path:
    """The cached build of llama-cpp-python that scripts/install.sh installed in this venv."""
    stamp = Path(sys.prefix) / ".llama-build-key"
    assert stamp.is_file(), f"no {stamp}: this venv was not made by scripts/install.sh (make install)"
    wheels = sorted((CACHE_HOME / "vramchat" / "llama-wheels" / stamp.read_text().strip()).glob("llama_cpp_python-*.whl"))
    assert wheels, f"the llama-cpp-python build {stamp.read_text().strip()} is not in {CACHE_HOME}/vramchat/llama-wheels"
    return wheels[-1]


def run(*command: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_CACHE_DIR": PIP_CACHE, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout}\n{result.stderr}"
    return result


def test_a_wheel_installs_working_commands_and_the_unit_templates(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", source, "-w", tmp_path / "dist", cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("vramchat-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", llama_wheel(), wheel, cwd=tmp_path)

    bin_dir = venv / "bin"
    assert run(bin_dir / "vramchat", "--version", cwd=tmp_path).stdout.strip() == f"vramchat {__version__}"
    assert run(bin_dir / "vramchatd", "--version", cwd=tmp_path).stdout.strip() == f"vramchatd {__version__}"
    installed = run(python, "-c", "import vramchat.tui; print(vramchat.tui.__file__)", cwd=tmp_path).stdout
    assert installed.startswith(str(venv)), installed  # the wheel's copy, not this checkout's
    unit = run(bin_dir / "vramchat", "service", "install", "--dry-run", cwd=tmp_path).stdout
    assert f"ExecStart={bin_dir / 'vramchatd'} " in unit and "Type=notify" in unit
    system_unit = run(bin_dir / "vramchat", "service", "install", "--system", "--dry-run", "--create-user", cwd=tmp_path).stdout
    assert "User=vramchat" in system_unit
    # The probe that `vramchat doctor` runs works from the wheel too (llama_cpp in that venv).
    assert "llama-cpp-python" in run(bin_dir / "vramchat", "doctor", "--no-decode", cwd=tmp_path).stdout
