"""Which device llama.cpp gives each layer when it offloads to several: its split, reproduced.

llama.cpp orders the offload devices as RPC devices first (in the order their servers were
added), then local GPUs (llama.cpp, llama_prepare_model_devices). With `split_mode` "none" only
`main_gpu` is used. The layers it offloads (`n_gpu_layers` = g: the output layer, then the last
g-1 repeating layers) are then shared out by `tensor_split`, or by each device's free memory
when none is given (llama-model.cpp, load_tensors):

    splits = cumulative(tensor_split) / sum(tensor_split)          # float32
    layer il (il >= i_gpu_start) -> upper_bound(splits, (il - i_gpu_start) / g)

so a tensor_split of whole layer counts gives each device exactly that many. Everything is in
float32 as in llama.cpp, so that a split point that falls on a layer falls the same way here.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

MIB = 1 << 20
# A CUDA context and cuBLAS workspace take memory that llama.cpp does not log; NVML sees it. An
# RPC server made its context when it started, so the free memory it reports already excludes it.
BACKEND_OVERHEAD_BYTES = {"CUDA": 512 * MIB, "RPC": 0}
SPLIT_MODES = ("layer", "row", "none")
SplitMode = Literal["layer", "row", "none"]


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class OffloadDevice:
    """A device llama.cpp can offload to, under llama.cpp's name for it ("CUDA0", "RPC0")."""

    name: str
    kind: str  # "CUDA" or "RPC"
    free: int = 0  # bytes free as the load will find them
    total: int = 0
    description: str | None = None
    endpoint: str | None = None  # the RPC server an RPC device is on
    # How llama.cpp's load log names its buffers, when not `name`: RPC<index on its server>[endpoint].
    buffer_name: str | None = None

    @property
    def overhead(self) -> int:
        return BACKEND_OVERHEAD_BYTES.get(self.kind, 0)

    @property
    def log_name(self) -> str:
        return self.buffer_name or self.name

    @classmethod
    def from_rpc(cls, device: dict[str, Any], allocated: int = 0) -> OffloadDevice:
        """From an RPC device as the engine reports it (daemon/llama/rpc.py Device); `allocated`: bytes
        the engine being replaced holds there, free again once it is gone."""
        return cls(
            device["name"],
            "RPC",
            free=(device.get("memory_free") or 0) + allocated,
            total=device.get("memory_total") or 0,
            description=device.get("description"),
            endpoint=device.get("endpoint"),
            buffer_name=device.get("buffer_name"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


def used_devices(devices: Sequence[OffloadDevice], split_mode: SplitMode, main_gpu: int) -> list[OffloadDevice]:
    """The devices a load uses, after llama.cpp's split-mode rules; PlacementError for a bad choice."""
    if split_mode not in SPLIT_MODES:
        raise PlacementError(f"split mode must be one of {', '.join(SPLIT_MODES)}, not {split_mode!r}")
    if devices and not 0 <= main_gpu < len(devices):
        names = ", ".join(f"{i} = {d.name}" for i, d in enumerate(devices))
        raise PlacementError(f"main_gpu {main_gpu} is not one of this load's devices ({names})")
    if split_mode == "none":
        return [devices[main_gpu]] if devices else []
    if split_mode == "row" and (odd := [d.name for d in devices if d.kind != "CUDA"]):
        raise PlacementError(
            f"split mode row splits matrices across CUDA GPUs, and {', '.join(odd)} cannot hold a row split: "
            "use split mode layer, or leave those devices out"
        )
    return list(devices)


def check_tensor_split(tensor_split: Sequence[float] | None, devices: Sequence[OffloadDevice]) -> None:
    if tensor_split is None:
        return
    if len(tensor_split) > len(devices):
        names = ", ".join(d.name for d in devices) or "none"
        raise PlacementError(
            f"tensor split has {len(tensor_split)} shares but this load has {len(devices)} offload devices ({names}): "
            "give one share per device, in that order"
        )
    if any(share < 0 for share in tensor_split) or not any(share > 0 for share in tensor_split):
        raise PlacementError("tensor split shares must be >= 0, and at least one above 0, e.g. 3,1")


def split_shares(devices: Sequence[OffloadDevice], tensor_split: Sequence[float] | None) -> list[float]:
    """Each device's share: tensor_split padded with zeros, or llama.cpp's default, free memory (a
    device planned without figures counts as one share)."""
    if tensor_split and any(tensor_split):
        return [float(x) for x in tensor_split] + [0.0] * (len(devices) - len(tensor_split))
    return [float(d.free or d.total or 1) for d in devices]


def layer_devices(n_layer: int, n_gpu_layers: int, shares: Sequence[float]) -> list[int | None]:
    """The device index of each layer 0..n_layer-1 and of the output (the last entry); None: the CPU."""
    if not shares or sum(shares) <= 0:
        return [None] * (n_layer + 1)
    cumulative, running = [], _f32(0.0)
    for share in shares:
        running = _f32(running + _f32(share))
        cumulative.append(running)
    splits = [_f32(c / running) for c in cumulative]
    first = max(n_layer + 1 - n_gpu_layers, 0)
    offloaded = min(n_gpu_layers, n_layer + 1)
    return [
        None if il < first or il - first >= offloaded else bisect.bisect_right(splits, _f32((il - first) / offloaded))
        for il in range(n_layer + 1)
    ]
