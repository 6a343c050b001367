"""A dry run of a load: llama.cpp sizes every buffer of a layout on every device, and allocates none.

`python -m vramchat.daemon.llama.dry_run` reads the engine's `load` message (shared/load_plan.py
`LoadPlan.llama_load`) as JSON on stdin and prints one JSON line: `{"log": llama.cpp's log,
"seconds"}`, or `{"error": llama.cpp's reason}`. shared/exact.py starts it before every load, and
for `vramchat plan --exact`: a process of its own, as the engine is, so that llama.cpp never runs
in the daemon or the CLI, and a file that makes llama.cpp abort kills only this process.

As llama.cpp's own fit (common/fit.cpp) does, the model params' `no_alloc` reads the metadata and
places every tensor without reading or allocating it; the context then logs the KV, output and
compute buffers its allocator sizes (`sched_reserve: RPC0[host:port] compute buffer size = ...`).
`no_alloc` needs load_mode NONE (llama.cpp's mmap path asserts `!no_alloc`), so the Llama is built
with use_mmap and use_mlock off; neither changes a compute or output buffer. Everything else is
built as the engine builds it: the RPC servers registered first (daemon/llama/rpc.py), then
ChatModel.load with the same Llama() arguments, tensor overrides and flash attention
(daemon/llama/params.py). Measured with the demo model: the compute buffers equal a real load's
on the CPU and on an RPC device, in 0.1 s.

An RPC server serves one client at a time: this process waits while another (the engine being
replaced) is connected, so the daemon stops that engine first (daemon/model_lifecycle.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from typing import Any

from vramchat.daemon.llama import rpc
from vramchat.daemon.llama.chat_model import ChatModel
from vramchat.daemon.llama.engine import die_with_parent, load_error_text


def measure(load: dict[str, Any], log_fd: int | None = None) -> dict[str, Any]:
    """The dry run of `load`: llama.cpp's log of the buffers it sized, or its reason for failing.
    Each log line is also written to `log_fd`, which llama-cpp-python's silencing of stderr during
    the load does not reach: the lines are there even if llama.cpp aborts the process."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        lines.append(line)
        if log_fd is not None:
            os.write(log_fd, text)

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))  # `on_log` must outlive the registration: it does
    started = time.monotonic()
    try:
        for endpoint in load.get("rpc_servers") or []:
            rpc.register_server(endpoint)
        offload = [d.name for d in rpc.local_devices() if d.type in ("GPU", "IGPU")]
    except rpc.RpcError as exc:
        return {"error": str(exc)}
    if (planned := load.get("devices") or []) != offload[: len(planned)]:
        return {"error": f"the plan expected the offload devices {planned}, and llama.cpp has {offload}; load again"}
    default = bindings.llama_model_default_params

    def sized_only() -> Any:
        params = default()
        params.no_alloc = True
        return params

    # Llama() takes its model params from this function of the bindings (daemon/llama/params.py).
    bindings.llama_model_default_params = sized_only
    try:
        ChatModel.load(
            load["model_path"],
            **{**load["llama"], "use_mmap": False, "use_mlock": False},
            cpu_tensors=load.get("cpu_tensors") or [],
            flash_attn_auto=bool(load.get("flash_attn_auto")),
        )
    except Exception as exc:  # llama-cpp-python raises ValueError for most load failures
        return {"error": load_error_text(exc, lines)}
    finally:
        bindings.llama_model_default_params = default
    return {"log": "".join(lines), "seconds": time.monotonic() - started}


def main() -> int:
    die_with_parent()
    answer = measure(json.load(sys.stdin), log_fd=os.dup(2))
    print(json.dumps(answer), flush=True)
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(main())
