"""What `Llama()` takes no argument for: a load progress callback, tensors kept in host RAM, and
flash attention left to llama.cpp ("auto").

Llama() builds its model parameters with `llama_model_default_params()`, called through the
module `llama_cpp.llama_cpp` (llama.py does `import llama_cpp.llama_cpp as llama_cpp`), so the
function is replaced there, for the one Llama() being made; patching the package attribute
`llama_cpp.llama_model_default_params` changes nothing. Likewise `llama_init_from_model`, which
_internals.py calls with the context params Llama() filled in.

Tensors whose names match a pattern in `cpu_tensors` (a regex, as llama.cpp's
`--override-tensor PATTERN=CPU`) are put in the CPU's buffer type whatever their layer's device:
that is how the experts of a mixture-of-experts model stay in RAM while the rest is offloaded.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class _TensorBuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _cpu_buffer_type() -> int:
    from vramchat.daemon.llama import rpc  # ggml's own library, loaded by its soname

    ggml = rpc.libraries().ggml
    ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    return int(ggml.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_by_type(0)))


@contextmanager
def model_params(
    on_progress: Callable[[float], None], cpu_tensors: Sequence[str] = (), *, flash_attn_auto: bool = False
) -> Iterator[list[Any]]:
    """While inside, every Llama() made reports its load progress to `on_progress`, keeps the
    tensors matching `cpu_tensors` in host RAM, and with `flash_attn_auto` lets llama.cpp decide
    on flash attention (Llama() takes only on or off). Yields the ctypes objects llama.cpp points
    to: keep them as long as the model."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    @llama_cpp.llama_progress_callback
    def callback(fraction: float, _user_data: ctypes.c_void_p) -> bool:
        on_progress(fraction)
        return True

    keep: list[Any] = [callback]
    overrides = None
    if cpu_tensors:
        buft = _cpu_buffer_type()
        overrides = (_TensorBuftOverride * (len(cpu_tensors) + 1))()  # NULL-terminated
        for entry, pattern in zip(overrides, cpu_tensors, strict=False):
            entry.pattern, entry.buft = pattern.encode(), buft
        keep.append(overrides)
    default = bindings.llama_model_default_params

    def hooked() -> Any:
        params = default()
        params.progress_callback = callback
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.addressof(overrides)
        return params

    init_context = bindings.llama_init_from_model

    def init_with_auto_flash_attn(model: Any, params: Any) -> Any:
        params.flash_attn_type = bindings.LLAMA_FLASH_ATTN_TYPE_AUTO
        return init_context(model, params)

    bindings.llama_model_default_params = hooked
    if flash_attn_auto:
        bindings.llama_init_from_model = init_with_auto_flash_attn
    try:
        yield keep
    finally:
        bindings.llama_model_default_params = default
        bindings.llama_init_from_model = init_context
