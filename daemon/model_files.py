"""Finding GGUF models: the configured model dirs, plus the demo model when it is installed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vramchat.shared import paths
from vramchat.shared.protocol import ProtocolError

GGUF_MAGIC = b"GGUF"
# The 135M demo model answers reliably only greedily and with a plain system prompt: "What is
# the capital of France?" gave Paris 20 times in 20 so, against 17 in 30 at temperature 0.7
# with the system prompt its chat template adds by itself. Other models get no such defaults.
DEMO_DEFAULTS: dict[str, Any] = {"system_prompt": "You are a helpful assistant.", "sampling": {"temperature": 0.0}}

# Split models (model-00002-of-00004.gguf) are loaded through their first part only.
_LATER_SPLIT_PART = re.compile(r"-0*([2-9]|\d{2,})-of-\d+\.gguf$")


def discover(model_dirs: list[Path]) -> list[dict[str, Any]]:
    """The demo model first, then every *.gguf under the model dirs, without duplicates."""
    found: list[dict[str, Any]] = []
    seen: set[Path] = set()

    def add(path: Path, source: str) -> None:
        resolved = path.resolve()
        if resolved in seen or _LATER_SPLIT_PART.search(path.name):
            return
        seen.add(resolved)
        try:
            size = path.stat().st_size
        except OSError:
            return
        found.append({"name": path.name, "path": str(path), "size_bytes": size, "source": source})

    if demo := paths.demo_model_path():
        add(demo, "demo")
    for directory in model_dirs:
        if directory.is_dir():
            for path in sorted(directory.rglob("*.gguf")):
                add(path, str(directory))
    return found


def defaults_for(path: Path) -> dict[str, Any]:
    """Default system prompt and sampling for a model, below a conversation's own settings."""
    demo = paths.demo_model_path()
    return DEMO_DEFAULTS if demo is not None and path.resolve() == demo.resolve() else {}


def resolve(name_or_path: str, model_dirs: list[Path], *, allow_any_path: bool) -> Path:
    """A model named in `discover()`'s list, or a path; errors say what to do instead."""
    known = discover(model_dirs)
    for model in known:
        if name_or_path in (model["name"], model["path"], Path(model["name"]).stem):
            check_gguf(Path(model["path"]))
            return Path(model["path"])
    path = Path(name_or_path).expanduser()
    if not path.exists():
        names = ", ".join(m["name"] for m in known) or "none"
        raise ProtocolError(
            "not_found",
            f"no model {name_or_path!r}: it is neither a known model (known: {names}) nor an existing file. "
            "Run `vramchat models` to list them, or add a directory with --models-dir.",
        )
    path = path.resolve()
    if not allow_any_path and not any(_is_under(path, d) for d in model_dirs):
        raise ProtocolError(
            "invalid_value",
            f"{path} is outside the configured model dirs; add its directory to model_dirs in the config, "
            "or set allow_any_model_path = true",
        )
    check_gguf(path)
    return path


def check_gguf(path: Path) -> None:
    if path.is_dir():
        raise ProtocolError("not_gguf", f"{path} is a directory; give the path of a .gguf file inside it")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ProtocolError("not_gguf", f"cannot read {path}: {exc.strerror}; check its permissions") from None
    if magic != GGUF_MAGIC:
        raise ProtocolError(
            "not_gguf",
            f"{path} is not a GGUF model (it starts with {magic!r}, not b'GGUF'). vramchat loads GGUF files; "
            "convert other formats with llama.cpp's convert_hf_to_gguf.py",
        )


def _is_under(path: Path, directory: Path) -> bool:
    try:
        path.relative_to(directory.resolve())
        return True
    except ValueError:
        return False
