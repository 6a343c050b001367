"""Dependencies flow one way: tui -> shared <- daemon (DESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FORBIDDEN = {
    "shared": ("textual", "llama_cpp", "vramchat.daemon", "vramchat.tui"),
    "daemon": ("textual", "vramchat.tui"),
    "tui": ("llama_cpp", "vramchat.daemon"),
}


# The one module of daemon/llama/ the daemon may import: JSON schemas to grammars, pure Python that
# loads llama-cpp-python's converter from its file without the native library (checked below).
PURE_LLAMA_MODULE = "vramchat.daemon.llama.grammar"


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


def test_llama_cpp_lives_in_daemon_llama_alone() -> None:
    """Everything that runs inside a llama.cpp process lives in daemon/llama/ (the engine, the RPC
    server, the dry run, doctor's probe), each started as a process of its own with `python -m`:
    only modules there import llama_cpp, and nothing outside imports them, so a native crash never
    takes the daemon down. The process boundary is the folder."""
    inside = ROOT / "daemon" / "llama"
    everything = [p for package in ("daemon", "shared", "tui") for p in (ROOT / package).rglob("*.py")]
    imports = {p: imported_modules(p) for p in everything}
    outside = {p: names for p, names in imports.items() if inside not in p.parents}
    assert [str(p.relative_to(ROOT)) for p, names in outside.items() if any(n.split(".")[0] == "llama_cpp" for n in names)] == []
    assert [
        str(p.relative_to(ROOT))
        for p, names in outside.items()
        if any(n.startswith("vramchat.daemon.llama") and not n.startswith(PURE_LLAMA_MODULE) for n in names)
    ] == []
    assert any("llama_cpp" in {n.split(".")[0] for n in names} for p, names in imports.items() if inside in p.parents)


def test_the_grammar_module_loads_no_native_code() -> None:
    """The daemon builds grammars from schemas (daemon/llama/grammar.py) without llama_cpp."""
    probe = (
        "import sys; import vramchat.daemon.llama.grammar as g; g.schema_grammar({'type': 'object'}, strict=False); "
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'llama_cpp' or m == 'vramchat.daemon.llama.engine']; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
