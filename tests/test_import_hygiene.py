"""Dependencies flow one way: tui -> shared <- daemon (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FORBIDDEN = {
    "shared": ("textual", "llama_cpp", "vramchat.daemon", "vramchat.tui"),
    "daemon": ("textual", "vramchat.tui"),
    "tui": ("llama_cpp", "vramchat.daemon"),
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from vramchat import daemon`
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_lane(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files in {package}/"
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[package])
    ]
    assert violations == []


def test_only_the_engine_process_imports_llama_cpp() -> None:
    """llama_cpp is loaded by the engine's child process alone (`python -m vramchat.daemon.engine`),
    so that a native crash never takes the daemon down: its modules are imported by nothing else.
    The RPC server (`python -m vramchat.daemon.rpc`) is a process of its own as well."""
    imports = {str(p.relative_to(ROOT)): imported_modules(p) for p in (ROOT / "daemon").rglob("*.py")}
    users = sorted(path for path, names in imports.items() if "llama_cpp" in {n.split(".")[0] for n in names})
    # daemon/build_probe.py runs alone too: `vramchat doctor` runs `python -m vramchat.daemon.build_probe`.
    assert users == [
        "daemon/build_probe.py",
        "daemon/chat_model.py",
        "daemon/engine.py",
        "daemon/llama_params.py",
        "daemon/rpc.py",
    ]
    # daemon/rpc.py also runs as its own process: `vramchat rpc-server` execs `python -m vramchat.daemon.rpc`,
    # and so does the daemon's probe of an RPC server's devices (daemon/rpc_probe.py).
    engine_modules = {
        "vramchat.daemon.engine",
        "vramchat.daemon.chat_model",
        "vramchat.daemon.llama_params",
        "vramchat.daemon.rpc",
    }
    # ... and `vramchat doctor`'s probe reads ggml's devices through daemon/rpc.py.
    assert sorted(path for path, names in imports.items() if names & engine_modules) == [
        "daemon/build_probe.py",
        "daemon/chat_model.py",
        "daemon/engine.py",
        "daemon/llama_params.py",
    ]
