"""What llama.cpp says it allocated when it loads a model, parsed from its log.

The lines look like (llama-cpp-python 0.3.36)::

    load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
    load_tensors:   CPU_REPACK model buffer size =     0.26 MiB
    load_tensors:        CUDA0 model buffer size =  7020.00 MiB
    load_tensors: offloaded 24/33 layers to GPU
    llama_context: n_ctx                 = 1024
    llama_context:        CPU  output buffer size =     0.19 MiB
    llama_kv_cache:        CPU KV buffer size =    22.50 MiB
    sched_reserve:        CPU compute buffer size =    98.25 MiB

A device on an RPC server (daemon/llama/rpc.py) carries its endpoint: `RPC0[127.0.0.1:50052] model
buffer size`, `RPC0[127.0.0.1:50052] KV buffer size`; it is an offload device like a GPU.

Older llama.cpp printed `llama_kv_cache_init: CUDA0 KV buffer size` and a device-less
`KV self size` total; the total is used only when no per-device KV line exists. llama.cpp prints
the sizes in MiB with two decimals, so a parsed size is within 0.005 MiB.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1 << 20
_BUFFER = re.compile(
    r"^\w+:\s+(?P<device>[\w.-]+(?:\[[^\]\s]+\])?)\s+"  # RPC devices carry their endpoint: RPC0[host:port]
    r"(?P<kind>model|KV|RS|compute|output|[\w ]+?) buffer size\s*=\s*(?P<mib>[\d.]+) MiB",
    re.M,
)
_KV_SELF = re.compile(r"^\w+: KV self size\s*=\s*(?P<mib>[\d.]+) MiB", re.M)
_OFFLOADED = re.compile(r"offloaded (?P<done>\d+)/(?P<total>\d+) layers to GPU")
_N_CTX = re.compile(r"^\w+: n_ctx\s+=\s+(?P<n_ctx>\d+)", re.M)


@dataclass
class BufferSize:
    kind: str  # "model", "kv", "rs", "compute", "output", or another name llama.cpp logs, lower case
    device: str  # as llama.cpp names it: "CPU", "CPU_Mapped", "CPU_REPACK", "CUDA0", "CUDA_Host", "RPC0[host:port]", ...
    bytes: int

    @property
    def on_gpu(self) -> bool:
        return not self.device.startswith("CPU") and not self.device.endswith("_Host")


@dataclass
class LoadReport:
    buffers: list[BufferSize] = field(default_factory=list)
    offloaded_layers: int | None = None
    total_layers: int | None = None
    n_ctx: int | None = None

    def total(self, kind: str | None = None, *, gpu: bool | None = None, device: str | None = None) -> int:
        """Bytes over the buffers of one kind, side (gpu True/False) or device; all if none given."""
        return sum(
            b.bytes
            for b in self.buffers
            if (kind is None or b.kind == kind) and (gpu is None or b.on_gpu == gpu) and (device is None or b.device == device)
        )

    def by_kind(self) -> dict[str, int]:
        return _sum_by(self.buffers, "kind")

    def by_device(self) -> dict[str, int]:
        return _sum_by(self.buffers, "device")

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "gpu_bytes": self.total(gpu=True),
            "cpu_bytes": self.total(gpu=False),
            "by_kind": self.by_kind(),
            "by_device": self.by_device(),
        }


def _sum_by(buffers: list[BufferSize], key: str) -> dict[str, int]:
    sums: dict[str, int] = defaultdict(int)
    for buffer in buffers:
        sums[getattr(buffer, key)] += buffer.bytes
    return dict(sums)


def parse_load_log(text: str) -> LoadReport:
    report = LoadReport()
    for match in _BUFFER.finditer(text):
        report.buffers.append(BufferSize(match["kind"].strip().lower(), match["device"], round(float(match["mib"]) * MIB)))
    if not any(b.kind == "kv" for b in report.buffers) and (kv_self := _KV_SELF.search(text)):
        report.buffers.append(BufferSize("kv", "unknown", round(float(kv_self["mib"]) * MIB)))
    if offloaded := _OFFLOADED.search(text):
        report.offloaded_layers, report.total_layers = int(offloaded["done"]), int(offloaded["total"])
    if n_ctx := _N_CTX.search(text):
        report.n_ctx = int(n_ctx["n_ctx"])
    return report
