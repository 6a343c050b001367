"""What a GGUF file holds, read from its metadata and tensor table (no llama.cpp needed).

The gguf package memory-maps the file, so inspecting a 40 GB model reads only its header.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFReader, LlamaFileType

_LAYER = re.compile(r"^blk\.(\d+)\.")


class GGUFError(Exception):
    """The file cannot be inspected; the message says why and what to do."""


@dataclass
class TensorInfo:
    name: str
    type: str
    bytes: int
    offset: int  # absolute position in the file


@dataclass
class GGUFInfo:
    path: str
    file_size: int
    architecture: str
    name: str | None
    file_type: str | None
    parameters: int
    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_ff: int | None
    n_head: list[int]  # per layer
    n_head_kv: list[int]  # per layer
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    sliding_window: int | None
    swa_layers: list[int]
    n_expert: int
    has_chat_template: bool
    tied_embeddings: bool
    quantization_mix: dict[str, int]  # tensor type name -> bytes
    layer_bytes: list[int]  # weights of each blk.N
    embedding_bytes: int  # token_embd.*
    output_bytes: int  # output.* and output_norm.*
    tensors: list[TensorInfo] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["tensors"]  # thousands of rows: callers that need them use the object
        return data


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    item = reader.fields.get(key)
    if item is None:
        return default
    value = item.contents()
    return value


def _per_layer(value: Any, n_layer: int, name: str) -> list[int]:
    if value is None:
        raise GGUFError(f"the GGUF has no {name}; it may be damaged or from an unsupported converter")
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GGUFError(f"{name} lists {len(value)} values for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def _swa_layers(reader: GGUFReader, arch: str, n_layer: int, window: int | None) -> list[int]:
    """Which layers attend through a sliding window, following llama.cpp's per-architecture rules."""
    if not window:
        return []
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # an explicit per-layer flag list (gpt-oss, newer converters)
        return [i for i, flag in enumerate(pattern) if flag]
    # Dense period: every Nth layer is global. gemma2 alternates, gemma3 and cohere2 use 6 and 4.
    period = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gemma3n": 5}.get(arch, int(pattern) if pattern else 0)
    if not period:
        return list(range(n_layer))
    return [i for i in range(n_layer) if (i + 1) % period != 0]


def inspect_gguf(path: str | Path) -> GGUFInfo:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path} is not a file")
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as exc:  # the gguf package raises ValueError, struct errors, IndexError...
        raise GGUFError(f"{path} is not a readable GGUF file ({exc}); it may be truncated or not a GGUF model") from None
    arch = _field(reader, "general.architecture")
    if not arch:
        raise GGUFError(f"{path} has no general.architecture: not a model GGUF")
    n_layer = int(_field(reader, f"{arch}.block_count", 0))
    if n_layer <= 0:
        raise GGUFError(f"{path} has no {arch}.block_count")
    n_embd = int(_field(reader, f"{arch}.embedding_length", 0))
    n_head = _per_layer(_field(reader, f"{arch}.attention.head_count"), n_layer, "attention.head_count")
    n_head_kv = _per_layer(_field(reader, f"{arch}.attention.head_count_kv", n_head), n_layer, "attention.head_count_kv")
    head_dim = n_embd // max(n_head)
    window = _field(reader, f"{arch}.attention.sliding_window")
    n_ff = _field(reader, f"{arch}.feed_forward_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens.data) if tokens else 0))

    tensors = [TensorInfo(t.name, t.tensor_type.name, int(t.n_bytes), int(t.data_offset)) for t in reader.tensors]
    layer_bytes = [0] * n_layer
    mix: dict[str, int] = defaultdict(int)
    embedding = output = 0
    for tensor in tensors:
        mix[tensor.type] += tensor.bytes
        if match := _LAYER.match(tensor.name):
            index = int(match.group(1))
            if index < n_layer:
                layer_bytes[index] += tensor.bytes
        elif tensor.name.startswith("token_embd"):
            embedding += tensor.bytes
        elif tensor.name.startswith("output"):
            output += tensor.bytes
    names = {t.name for t in tensors}
    file_type = _field(reader, "general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    return GGUFInfo(
        path=str(path),
        file_size=path.stat().st_size,
        architecture=str(arch),
        name=_field(reader, "general.name"),
        file_type=file_type_name,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        n_layer=n_layer,
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 0)),
        n_embd=n_embd,
        n_ff=int(n_ff[0] if isinstance(n_ff, list) else n_ff) if n_ff is not None else None,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(_field(reader, f"{arch}.attention.key_length", head_dim)),
        head_dim_v=int(_field(reader, f"{arch}.attention.value_length", head_dim)),
        n_vocab=n_vocab,
        sliding_window=int(window) if window else None,
        swa_layers=_swa_layers(reader, arch, n_layer, window),
        n_expert=int(_field(reader, f"{arch}.expert_count", 0)),
        has_chat_template="tokenizer.chat_template" in reader.fields,
        tied_embeddings="output.weight" not in names,
        quantization_mix=dict(mix),
        layer_bytes=layer_bytes,
        embedding_bytes=embedding,
        output_bytes=output,
        tensors=tensors,
    )
