"""What llama.cpp's dry run costs a load (issue 22), against the load it protects.

Before every load the daemon runs a `no_alloc` dry run of the layout in a process of its own
(shared/exact.py, daemon/llama/dry_run.py). Three models, every layer on the CPU (this machine
has no GPU): the demo model, a ~1 GB random-weights Q4_0 llama (written once to the cache, shared
with speed_estimate) and a sparse file with a 7B layout: a real-size header written by gguf's
GGUFWriter, the file truncated to its full size, zeros for weights, which llama.cpp loads at real
cost (its Q4_0 matrices are repacked, so every byte is read). A real daemon loads each; a round
is one `load` request, its seconds as the client sees them, and the dry run's share of them
(the plan's `dry_run.seconds`, the process's start included). The load is best case: the file's
pages are in the page cache (or are holes), where a first load reads them from the disk.
Target: the dry run costs at most 10% of the 7B load.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

from benchmarks.common import daemon, demo_model, loadavg, target
from vramchat.shared import paths
from vramchat.shared.client import Client

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from gguf_factory import RandomLlamaSpec, _add_llama_shape, _add_tokenizer, layer_matrices, random_llama

N_CTX = 4096
SHARE_TARGET = 0.10
# Llama-2-7B's shape, Q4_0 (18 bytes per 32 weights): 3.6 GiB of weights.
SEVEN_B = RandomLlamaSpec(n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, n_vocab=32000)


def write_sparse_llama(path: Path, spec: RandomLlamaSpec) -> Path:
    """A Q4_0 llama of `spec`'s layout at its full size whose weights are zeros: the header by
    GGUFWriter, then the file truncated to where its last tensor ends (holes, no disk used)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"sparse-Q4_0-llama-{spec.n_layer}L-{spec.n_embd}d")
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    _add_llama_shape(writer, spec)
    _add_tokenizer(writer, spec.n_vocab)
    matrices = [("token_embd", spec.n_vocab, spec.n_embd), ("output", spec.n_vocab, spec.n_embd)]
    norms = ["output_norm"]
    for i in range(spec.n_layer):
        norms += [f"blk.{i}.attn_norm", f"blk.{i}.ffn_norm"]
        matrices += [(f"blk.{i}.{name}", rows, cols) for name, rows, cols in layer_matrices(spec)]
    sizes = []
    for name in norms:
        writer.add_tensor_info(f"{name}.weight", (spec.n_embd,), np.dtype(np.float32), spec.n_embd * 4)
        sizes.append(spec.n_embd * 4)
    for name, rows, cols in matrices:
        row_bytes = cols // 32 * 18
        q4_0 = GGMLQuantizationType.Q4_0
        writer.add_tensor_info(f"{name}.weight", (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, q4_0)
        sizes.append(rows * row_bytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    header = writer.fout[0].tell()
    writer.close()
    align = writer.data_alignment
    with path.open("r+b") as handle:
        handle.truncate(GGUFWriter.ggml_pad(header, align) + sum(GGUFWriter.ggml_pad(size, align) for size in sizes))
    return path


async def rounds_of(runtime_dir: Path, model: Path, rounds: int) -> dict[str, float]:
    """Load `model` `rounds` times, each into a fresh engine, nothing loaded before it."""
    loads, dry, engine = [], [], []
    async with Client(runtime_dir, timeout=600) as client:
        for _ in range(rounds):
            await client.request("unload", {})
            started = time.monotonic()
            state = (await client.request("load", {"model": str(model), "n_gpu_layers": 0, "n_ctx": N_CTX}, timeout=600))["model"]
            loads.append(time.monotonic() - started)
            dry.append(state["plan"]["dry_run"]["seconds"])
            engine.append(state["load_seconds"])
        await client.request("unload", {})
    return {"load_s": statistics.median(loads), "dry_run_s": statistics.median(dry), "engine_load_s": statistics.median(engine)}


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    folder = Path(tempfile.mkdtemp(prefix="vcb-dry-"))
    seven_b = SEVEN_B if not quick else RandomLlamaSpec(n_layer=2, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008)
    models = {
        "demo": demo_model(),
        "q4_0_1gb" if not quick else "q4_0_4_layers": random_llama(
            paths.cache_dir() / "bench-models", RandomLlamaSpec(n_layer=4) if quick else RandomLlamaSpec()
        ),
        "sparse_7b" if not quick else "sparse_7b_2_layers": write_sparse_llama(folder / "sparse-7b.gguf", seven_b),
    }
    figures: dict[str, Any] = {}
    try:
        with daemon("--no-load", config="allow_any_model_path = true\n") as d:
            for name, path in models.items():
                measured = asyncio.run(rounds_of(d.runtime_dir, path, rounds))
                figures[f"{name}_file_gib"] = path.stat().st_size / (1 << 30)
                figures |= {f"{name}_{key}": value for key, value in measured.items()}
                figures[f"{name}_dry_run_share"] = measured["dry_run_s"] / measured["load_s"]
    finally:
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    big = "sparse_7b" if not quick else "sparse_7b_2_layers"
    share = figures[f"{big}_dry_run_share"]
    demo_share = figures["demo_dry_run_share"]
    return {
        "name": "dry run before a load",
        "settings": {"n_ctx": N_CTX, "n_gpu_layers": 0, "rounds": rounds, "seven_b": f"{seven_b.n_layer} layers, Q4_0, sparse"},
        **figures,
        "load_average_after": loadavg(),
        "targets": [
            target(
                f"{big}_dry_run_share",
                f"<= {SHARE_TARGET:.0%} of the load",
                share <= SHARE_TARGET,
                f"the dry run took {figures[f'{big}_dry_run_s']:.2f} s of a {figures[f'{big}_load_s']:.2f} s load; its "
                f"floor is a Python process importing llama_cpp, which the demo model's {figures['demo_load_s']:.2f} s "
                f"load also pays ({demo_share:.0%} there)",
            )
        ],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
