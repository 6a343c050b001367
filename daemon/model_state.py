"""What the daemon knows of its model: the state every client sees, and the checked parameters of a load."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

# "unloaded": the engine was stopped to give its memory back (keep_alive, `vramchat unload`); the
# next request loads the same model again with the same settings.
ModelStateName = Literal["idle", "loading", "ready", "unloaded", "error", "crashed"]


@dataclass(frozen=True)
class ModelState:
    """What the `model` event and the snapshot say about the model (docs/protocol.md, `model`)."""

    state: ModelStateName = "idle"
    name: str | None = None
    path: str | None = None
    n_gpu_layers: int | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    progress: float | None = None
    error: str | None = None
    engine_pid: int | None = None
    load_seconds: float | None = None
    chat_template: str | None = None
    reloading: bool = False  # after a crash: whether the daemon reloads by itself
    unloaded_reason: str | None = None  # why it is "unloaded": "idle for 5m (keep_alive)", ...
    plan: dict[str, Any] | None = None  # the planner's LoadPlan.to_dict()
    split: dict[str, Any] | None = None  # what llama.cpp allocated (shared.llama_log.LoadSplit)
    state_cache_bytes: int | None = None
    # The devices of the RPC servers this load uses (daemon/llama/rpc.py Device: name, description,
    # type, memory_free, memory_total, endpoint), as the engine found them when it connected.
    rpc_devices: list[dict[str, Any]] | None = None

    @property
    def available(self) -> bool:
        """A request queued now will be answered: a model is loaded, loading, or coming back."""
        return self.state in ("loading", "ready", "unloaded") or (self.state == "crashed" and self.reloading)

    def status_line(self) -> str:
        """One line for `systemctl status`."""
        name = self.name or "no model"
        if self.state == "ready":
            return f"serving {name} ({self.n_gpu_layers} GPU layers, n_ctx {self.n_ctx})"
        if self.state in ("error", "crashed"):
            return f"{self.state}: {self.error}"
        if self.state == "unloaded":
            return f"unloaded {name} {self.unloaded_reason}; the next request loads it again"
        return f"{self.state} {name}"

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadParams:
    """A checked load request, with n_gpu_layers (and with several devices, the split) resolved by the plan."""

    model_path: str
    n_threads: int
    state_cache_bytes: int
    plan: dict[str, Any]
    llama: dict[str, Any]  # Llama() arguments (shared/load_options.py llama_args)
    rpc_servers: tuple[str, ...] = ()  # "HOST:PORT" of each `vramchat rpc-server` to offload to
    devices: tuple[str, ...] = ()  # the offload devices the plan counted on, in llama.cpp's order
    cpu_tensors: tuple[str, ...] = ()  # tensor-name patterns kept in host RAM (--n-cpu-moe)
    flash_attn_auto: bool = False

    @property
    def n_gpu_layers(self) -> int:
        return int(self.llama["n_gpu_layers"])

    @property
    def n_ctx(self) -> int:
        return int(self.llama["n_ctx"])

    def for_engine(self) -> dict[str, Any]:
        """The engine's `load` message (daemon/llama/engine.py)."""
        return {
            "model_path": self.model_path,
            "llama": self.llama,
            "state_cache_bytes": self.state_cache_bytes,
            "rpc_servers": list(self.rpc_servers),
            "devices": list(self.devices),
            "cpu_tensors": list(self.cpu_tensors),
            "flash_attn_auto": self.flash_attn_auto,
        }
