"""The parser of llama.cpp's load log, on a real log from this llama.cpp and on GPU lines."""

from __future__ import annotations

from pathlib import Path

from vramchat.shared.llama_log import parse_load_log

from gguf_factory import TinyModelSpec, write_tiny_llama
from helpers import load_log

MIB = 1 << 20


def test_a_real_load_log_gives_every_buffer_once(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "q4.gguf", TinyModelSpec(n_layer=3, n_embd=128, n_ff=256, quant="Q4_0"))
    log = load_log(path, n_ctx=1000)
    report = parse_load_log(log)
    logged = {line.split(":", 1)[1].split("=")[0].strip() for line in log.splitlines() if "buffer size =" in line}
    assert len(report.buffers) == len(logged)  # and not the destructor's "compute buffer size is" line
    assert {b.kind for b in report.buffers} == {"model", "kv", "compute", "output"}
    assert report.n_ctx == 1024  # llama.cpp pads the 1000 asked for to 256
    assert report.total("kv") == 3 * 1024 * 2 * 128 * 2  # layers x cells x (K, V) x n_embd_gqa x f16
    assert report.total(gpu=True) == 0 and report.total(gpu=False) == sum(b.bytes for b in report.buffers)
    if "CPU_REPACK" in log:  # this CPU repacks Q4_0 matrices out of the map
        assert set(report.by_device()) >= {"CPU_Mapped", "CPU_REPACK", "CPU"}
        assert report.by_kind()["model"] == report.total(device="CPU_Mapped") + report.total(device="CPU_REPACK")


def test_gpu_lines_offload_count_and_sums() -> None:
    report = parse_load_log(
        "load_tensors: offloaded 24/33 layers to GPU\n"
        "load_tensors:        CUDA0 model buffer size =  7020.00 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =  2500.50 MiB\n"
        "llama_context:  CUDA_Host  output buffer size =     0.49 MiB\n"
        "llama_kv_cache:      CUDA0 KV buffer size =   768.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =   256.00 MiB\n"
        "sched_reserve:      CUDA0 compute buffer size =   560.00 MiB\n"
        "sched_reserve:  CUDA_Host compute buffer size =    24.01 MiB\n"
        "llama_context: n_ctx                 = 8192\n"
    )
    assert (report.offloaded_layers, report.total_layers, report.n_ctx) == (24, 33, 8192)
    assert report.total(gpu=True) == (7020 + 768 + 560) * MIB
    assert report.total("model", gpu=False) == round(2500.5 * MIB)
    assert report.total("compute", gpu=False) == round(24.01 * MIB)  # CUDA_Host is pinned host RAM
    assert report.by_device()["CUDA0"] == (7020 + 768 + 560) * MIB
    assert report.by_kind()["kv"] == 1024 * MIB
    data = report.to_dict()
    assert data["gpu_bytes"] == report.total(gpu=True) and data["cpu_bytes"] == report.total(gpu=False)


def test_older_llama_cpp_kv_self_size_is_a_fallback_only() -> None:
    old = (
        "llama_new_context_with_model: KV self size  =  256.00 MiB, K (f16):  128.00 MiB\n"
        "llama_new_context_with_model: n_ctx      = 2048\n"
    )
    report = parse_load_log(old)
    assert report.total("kv") == 256 * MIB and report.n_ctx == 2048
    both = parse_load_log("llama_kv_cache_init:      CUDA0 KV buffer size =   256.00 MiB\n" + old)
    assert both.total("kv") == 256 * MIB and [b.device for b in both.buffers] == ["CUDA0"]


def test_nothing_logged_gives_an_empty_report() -> None:
    report = parse_load_log("llama_model_load: error loading model\n")
    assert report.buffers == [] and report.offloaded_layers is None and report.n_ctx is None
    assert report.to_dict()["gpu_bytes"] == 0
