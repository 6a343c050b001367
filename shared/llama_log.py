"""What llama.cpp says it allocated when it loads a model, parsed from its log.

The lines look like::

    load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
    load_tensors:        CUDA0 model buffer size =  7020.00 MiB
    llama_kv_cache:        CPU KV buffer size =    45.00 MiB
    sched_reserve:        CPU compute buffer size =    99.38 MiB
    llama_context:        CPU  output buffer size =     0.19 MiB
    load_tensors: offloaded 24/33 layers to GPU
    llama_context: n_ctx                 = 2048

llama.cpp prints the sizes in MiB with two decimals, so a parsed size is within 0.005 MiB.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

_BUFFER = re.compile(r"^\w+:\s+(?P<device>\S+)\s+(?P<kind>model|KV|compute|output)\s+buffer size\s*=\s*(?P<mib>[\d.]+) MiB", re.M)
_OFFLOADED = re.compile(r"offloaded (?P<done>\d+)/(?P<total>\d+) layers to GPU")
_N_CTX = re.compile(r"^llama_context: n_ctx\s+=\s+(?P<n_ctx>\d+)", re.M)


@dataclass
class BufferSize:
    kind: str  # "model", "kv", "compute" or "output"
    device: str  # as llama.cpp names it: "CPU", "CPU_Mapped", "CUDA0", "CUDA_Host", ...
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

    def total(self, kind: str | None = None, *, gpu: bool | None = None) -> int:
        return sum(b.bytes for b in self.buffers if (kind is None or b.kind == kind) and (gpu is None or b.on_gpu == gpu))

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "gpu_bytes": self.total(gpu=True),
            "cpu_bytes": self.total(gpu=False),
        }


def parse_load_log(text: str) -> LoadReport:
    report = LoadReport()
    for match in _BUFFER.finditer(text):
        report.buffers.append(
            BufferSize(kind=match["kind"].lower(), device=match["device"], bytes=round(float(match["mib"]) * 1048576))
        )
    if offloaded := _OFFLOADED.search(text):
        report.offloaded_layers, report.total_layers = int(offloaded["done"]), int(offloaded["total"])
    if n_ctx := _N_CTX.search(text):
        report.n_ctx = int(n_ctx["n_ctx"])
    return report
