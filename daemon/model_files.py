"""Finding GGUF models: the demo model, the configured model dirs, and the Hugging Face cache.

A split model (Model-00001-of-00003.gguf ...) is one model, listed at its first file, which
llama.cpp loads the set from. The hub cache (shared/paths.hf_hub_cache) counts as a model dir:
its models are named as llama.cpp's `-hf` names them, ORG/NAME:QUANT.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vramchat.shared import paths
from vramchat.shared.gguf import GGUFError, inspect_cached, quant_in_name, quant_name
from vramchat.shared.gguf_split import SplitName, split_name
from vramchat.shared.protocol import ProtocolError

GGUF_MAGIC = b"GGUF"
HF_SOURCE = "hf cache"
# The 135M demo model answers reliably only greedily and with a plain system prompt: "What is
# the capital of France?" gave Paris 20 times in 20 so, against 17 in 30 at temperature 0.7
# with the system prompt its chat template adds by itself. Other models get no such defaults.
DEMO_DEFAULTS: dict[str, Any] = {"system_prompt": "You are a helpful assistant.", "sampling": {"temperature": 0.0}}

# GGUFs that are not language models: a vision projector, an importance matrix.
_NOT_A_MODEL = re.compile(r"(mmproj|imatrix)[^/]*$", re.I)


def discover(model_dirs: list[Path]) -> list[dict[str, Any]]:
    """The demo model first, then the models under the model dirs, then those in the hub cache,
    without duplicates. Each: name, path (the first file of a split set), size_bytes (of every
    file), source, shards; a hub model also repo and quant."""
    found: list[dict[str, Any]] = []
    seen: set[Path] = set()

    def add(model: dict[str, Any]) -> None:
        resolved = Path(model["path"]).resolve()
        if resolved not in seen:
            seen.add(resolved)
            found.append(model)

    if demo := paths.demo_model_path():
        add({"name": demo.name, "path": str(demo), "size_bytes": demo.stat().st_size, "source": "demo", "shards": 1})
    for directory in model_dirs:
        if directory.is_dir():
            for group in _models_in(directory, sorted(directory.rglob("*.gguf"))):
                split = _split_of(group)
                add({**_listed(group, split.set_name if split else group[0].name), "source": str(directory)})
    for model in _hub_models(paths.hf_hub_cache()):
        add(model)
    return found


def _models_in(folder: Path, files: list[Path]) -> Iterator[list[Path]]:
    """The models among `files` (sorted), each as its files: one, or the files of a split set
    present (the first one first, or the lowest present: loading it names the missing one)."""
    models: dict[tuple[str, int], list[Path]] = {}
    for path in files:
        if _NOT_A_MODEL.search(path.relative_to(folder).as_posix()) or not path.exists():  # a link to a missing blob
            continue
        name = split_name(path)
        models.setdefault((name.prefix, name.count) if name and name.count > 1 else (str(path), 1), []).append(path)
    yield from models.values()


def _split_of(files: list[Path]) -> SplitName | None:
    """The numbers in the name of a split set's first file present; None for a model in one file."""
    split = split_name(files[0])
    return split if split is not None and split.count > 1 else None


def _listed(files: list[Path], name: str) -> dict[str, Any]:
    """A model's entry, before its source."""
    split = _split_of(files)
    return {
        "name": name,
        "path": str(files[0]),
        "size_bytes": sum(f.stat().st_size for f in files),
        "shards": split.count if split else 1,
    }


def _hub_models(cache: Path) -> Iterator[dict[str, Any]]:
    """The GGUF models in a hub cache (models--ORG--NAME/snapshots/COMMIT/PATH, links to blobs/):
    the revision refs/main names first, then older ones for files main lacks. A split set
    counts only when every file is there: the rest may still be downloading."""
    for repo_dir in sorted(cache.glob("models--*--*")):
        repo = repo_dir.name.removeprefix("models--").replace("--", "/")
        main = repo_dir / "refs" / "main"
        commit = main.read_text().strip() if main.is_file() else None
        snapshots = repo_dir / "snapshots"
        found = [d for d in snapshots.iterdir() if d.is_dir()] if snapshots.is_dir() else []
        revisions = sorted(found, key=lambda d: (d.name != commit, d.name))
        models: dict[str, list[Path]] = {}  # path in the repo (a set's without the numbers) -> files
        for revision in revisions:
            for group in _models_in(revision, sorted(revision.rglob("*.gguf"))):
                split = _split_of(group)
                if split is None:
                    models.setdefault(group[0].relative_to(revision).as_posix(), group)
                elif len(group) == split.count and split.no == 1:
                    models.setdefault(Path(split.prefix).relative_to(revision).as_posix() + ".gguf", group)
        quants = {key: _quant(key, group[0]) for key, group in models.items()}
        for key, group in models.items():
            quant = quants[key]
            unique = quant != "?" and list(quants.values()).count(quant) == 1
            yield {**_listed(group, f"{repo}:{quant if unique else key}"), "source": HF_SOURCE, "repo": repo, "quant": quant}


def _quant(path_in_repo: str, first: Path) -> str:
    """The quantization the file's path names, else its general.file_type, else "?"."""
    if quant := quant_in_name(path_in_repo):
        return quant
    try:
        return quant_name(inspect_cached(first).file_type)
    except (GGUFError, OSError):
        return "?"


def defaults_for(path: Path) -> dict[str, Any]:
    """Default system prompt and sampling for a model, below a conversation's own settings."""
    demo = paths.demo_model_path()
    return DEMO_DEFAULTS if demo is not None and path.resolve() == demo.resolve() else {}


def display_name(path: Path, model_dirs: list[Path]) -> str:
    """How `models` names the model at `path` (a hub model by repo and quant), else its file name."""
    return next((m["name"] for m in discover(model_dirs) if m["path"] == str(path)), path.name)


def resolve(name_or_path: str, model_dirs: list[Path], *, allow_any_path: bool) -> Path:
    """A model named in `discover()`'s list, or a path; errors say what to do instead.

    Any file of a split set stands for the set. A path keeps its last link: a hub model's files
    are links to blobs named by their hash, and llama.cpp finds a set's other files by name.
    """
    known = discover(model_dirs)
    for model in known:
        first = Path(model["path"])
        if name_or_path in (model["path"], first.name, first.stem, model["name"], model["name"].removesuffix(".gguf")):
            check_gguf(first)
            return first
    for model in known:  # ORG/NAME:q4_k_m as llama.cpp's -hf takes it
        if name_or_path.casefold() == model["name"].casefold():
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
    path = Path(os.path.abspath(path))
    allowed = [*model_dirs, paths.hf_hub_cache()]
    if not allow_any_path and not any(_is_under(path.resolve(), d) for d in allowed):
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
