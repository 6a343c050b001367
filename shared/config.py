"""The optional TOML config file shared by the daemon and the clients.

Example (every key is optional)::

    model_dirs = ["~/models"]
    default_model = "~/models/llama-3-70b.Q4_K_M.gguf"
    n_gpu_layers = 24          # or "auto" to fit the VRAM budget
    n_ctx = 4096
    n_threads = 8
    allow_any_model_path = false   # true lets clients load any path the daemon can read
    state_cache_mib = 512      # RAM for the KV state of recent conversations (instant resume); 0 = off
    ram_budget = "48GiB"       # the RAM a load may count on, at most (default: what the kernel has available)
    context_overflow = "drop_oldest"   # a conversation longer than n_ctx: or "error"; per conversation too
    keep_alive = "30m"         # unload the model after this long without a request (default: never)

    # Daemon: also listen on TCP (control on PORT, events on PORT+1), CURVE-encrypted; only
    # client keys in <data dir>/curve/authorized_keys/ get in. See `vramchatd keys`.
    tcp_listen = "0.0.0.0:5555"

    # Daemon: serve the OpenAI-compatible API (Authorization: Bearer `vramchat api-key`).
    http_listen = "127.0.0.1:8080"
    http_allow_remote = false  # true lets http_listen name an address other tools reach over the network

    # Daemon: offload to the devices of these `vramchat rpc-server`s (llama.cpp RPC), as if
    # they were local GPUs. No encryption: reach another machine's through an SSH tunnel
    # (ssh -N -L 50052:127.0.0.1:50052 gpu-box) and name the tunnel's end here.
    rpc_servers = ["127.0.0.1:50052"]
    # How layers are shared among the offload devices (RPC devices first, then local GPUs):
    split_mode = "layer"       # or "none" (main_gpu alone) or "row" (CUDA GPUs only)
    main_gpu = 0
    tensor_split = [3, 1]      # each device's share; default: by free memory

    # Load options (each also a field of the `load` request and a flag of `vramchat load`):
    cache_type_k = "q8_0"      # f16 (default), q8_0, q4_0, bf16, f32
    cache_type_v = "q8_0"      # quantized V needs flash attention
    flash_attn = "on"          # "off" (default), "on", "auto"
    n_batch = 512
    n_ubatch = 512
    n_cpu_moe = 20             # experts of the first 20 layers stay in RAM; "all" = --cpu-moe
    use_mmap = true
    use_mlock = false

    # Client: attach to a daemon over TCP instead of the local sockets.
    server = "tcp://gpu-box:5555"
    server_public_key = "~/.config/vramchat/gpu-box.key"   # or the key's z85 text
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramchat.shared import paths
from vramchat.shared.load_options import settings_from
from vramchat.shared.planner import PlanError
from vramchat.shared.protocol import CONTEXT_OVERFLOW_POLICIES
from vramchat.shared.rpc_endpoints import EndpointError, parse_endpoint
from vramchat.shared.units import parse_duration, parse_size

# The load options a config may set, checked as a request's are (shared/load_options.py).
LOAD_OPTIONS = (
    "split_mode",
    "main_gpu",
    "tensor_split",
    "cache_type_k",
    "cache_type_v",
    "flash_attn",
    "n_batch",
    "n_ubatch",
    "n_cpu_moe",
    "use_mmap",
    "use_mlock",
)


class ConfigError(Exception):
    pass


@dataclass
class Config:
    model_dirs: list[Path] = field(default_factory=list)
    default_model: str | None = None
    n_gpu_layers: int | str = 0
    n_ctx: int = 4096
    n_threads: int | None = None
    # Let clients `load` any readable path, not only files under model_dirs and the demo model.
    allow_any_model_path: bool = False
    state_cache_mib: int = 512
    ram_budget: int | None = None  # bytes; the swap guard counts on no more than this
    context_overflow: str = "drop_oldest"
    keep_alive_s: float | None = None  # seconds without a request before the model is unloaded; None: never
    tcp_listen: str | None = None
    http_listen: str | None = None
    http_allow_remote: bool = False
    rpc_servers: list[str] = field(default_factory=list)
    # The load options of shared/load_options.py by their request names (split_mode, tensor_split,
    # cache_type_k, flash_attn, n_cpu_moe, use_mlock, ...): the defaults of every load.
    load_options: dict[str, Any] = field(default_factory=dict)
    server: str | None = None
    server_public_key: str | None = None
    source: Path | None = None

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: Path | None = None) -> Config:
        config = cls(source=source)
        where = f" in {source}" if source else ""
        dirs = raw.get("model_dirs", [])
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise ConfigError(f"model_dirs{where} must be a list of paths")
        config.model_dirs = [Path(d).expanduser() for d in dirs]
        if (model := raw.get("default_model")) is not None:
            if not isinstance(model, str):
                raise ConfigError(f"default_model{where} must be a path or a model name")
            config.default_model = model
        layers = raw.get("n_gpu_layers", config.n_gpu_layers)
        if not (layers == "auto" or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)):
            raise ConfigError(f'n_gpu_layers{where} must be a whole number >= 0 or "auto"')
        config.n_gpu_layers = layers
        for name, least in (("n_ctx", 1), ("n_threads", 1), ("state_cache_mib", 0)):
            if name in raw:
                value = raw[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ConfigError(f"{name}{where} must be a whole number >= {least}")
                setattr(config, name, value)
        for name in ("tcp_listen", "http_listen", "server", "server_public_key"):
            if name in raw:
                if not isinstance(raw[name], str):
                    raise ConfigError(f"{name}{where} must be a string")
                setattr(config, name, raw[name])
        if config.server and not config.server.startswith("tcp://"):
            raise ConfigError(f'server{where} must look like "tcp://HOST:PORT"')
        if config.server and not config.server_public_key:
            raise ConfigError(f"server{where} needs server_public_key: the daemon's server.key (see `vramchatd keys`)")
        if "rpc_servers" in raw:
            servers = raw["rpc_servers"]
            if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
                raise ConfigError(f'rpc_servers{where} must be a list of "HOST:PORT" strings')
            try:
                for server in servers:
                    parse_endpoint(server)
            except EndpointError as exc:
                raise ConfigError(f"rpc_servers{where}: {exc}") from None
            config.rpc_servers = list(dict.fromkeys(servers))
        if "context_overflow" in raw:
            if raw["context_overflow"] not in CONTEXT_OVERFLOW_POLICIES:
                raise ConfigError(f"context_overflow{where} must be one of {', '.join(CONTEXT_OVERFLOW_POLICIES)}")
            config.context_overflow = raw["context_overflow"]
        config.load_options = {name: raw[name] for name in LOAD_OPTIONS if name in raw}
        try:
            settings_from(config.load_options, {}, config.n_ctx)
        except PlanError as exc:
            raise ConfigError(f"{exc}{where}") from None
        if "ram_budget" in raw:
            try:
                config.ram_budget = parse_size(raw["ram_budget"]) if isinstance(raw["ram_budget"], str) else None
            except ValueError as exc:
                raise ConfigError(f"ram_budget{where}: {exc}") from None
            if config.ram_budget is None:
                raise ConfigError(f'ram_budget{where} must be a size such as "48GiB"')
        if "keep_alive" in raw:
            try:
                config.keep_alive_s = parse_duration(raw["keep_alive"])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"keep_alive{where}: {exc}") from None
        for name in ("allow_any_model_path", "http_allow_remote"):
            if name in raw:
                if not isinstance(raw[name], bool):
                    raise ConfigError(f"{name}{where} must be true or false")
                setattr(config, name, raw[name])
        return config

    def load_defaults(self) -> dict[str, Any]:
        """The load options a `load` request leaves out (shared/load_options.py settings_from checks them)."""
        return dict(self.load_options)


def load_config(override: str | Path | None = None) -> Config:
    """Read the config file; a missing default file means defaults, a missing explicit one is an error."""
    path = paths.config_path(override)
    if not path.exists():
        if override or os.environ.get("VRAMCHAT_CONFIG"):
            raise ConfigError(f"config file {path} does not exist")
        return Config()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return Config.from_mapping(raw, source=path)
