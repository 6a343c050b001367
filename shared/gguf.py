"""What a GGUF file holds, read from its metadata and tensor table (no llama.cpp needed).

The gguf package memory-maps the file, so a 40 GB model costs only its header. What does cost
time is the vocabulary: GGUFReader makes a numpy view per token string (2 s for 49k tokens).
`_HeaderReader` skips string arrays and reads number arrays in one piece instead.
"""

from __future__ import annotations

import functools
import re
import struct
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, LlamaFileType

from vramchat.shared import gguf_split

_LAYER = re.compile(r"^blk\.(\d+)\.")
_EXPERTS = re.compile(r"^blk\.\d+\.ffn_\w+_exps\.")

# Architectures llama.cpp gives sliding-window layers (src/models/<arch>.cpp, load_swa_pattern):
# arch -> (period, the window when the file names none). With period p, layer i slides when
# i % p < p - 1, i.e. every p-th layer is global; a period of 0 makes every layer slide.
# A window of None means llama.cpp uses no window unless the file sets one.
SWA_RULES: dict[str, tuple[int, int | None]] = {
    "gemma2": (2, 4096),
    "gemma3": (6, None),
    "gemma3n": (5, None),
    "cohere2": (4, None),
    "gpt-oss": (2, None),
    "olmo2": (4, None),
    "plamo3": (8, None),
}


class GGUFError(Exception):
    """The file cannot be inspected; the message says why and what to do."""


class _HeaderReader(GGUFReader):
    """GGUFReader that keeps only the length of string arrays (the vocabulary, the merges)."""

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        offs = orig_offs + 12
        item = GGUFValueType(int(item_type[0]))
        if item == GGUFValueType.STRING:
            buffer = memoryview(self.data)  # type: ignore[arg-type]  # a numpy memmap is a buffer
            u64 = struct.Struct(">Q" if self.byte_order == "S" else "<Q")
            for _ in range(int(length[0])):
                offs += 8 + u64.unpack_from(buffer, offs)[0]
            return offs - orig_offs, [item_type, length], [], [GGUFValueType.ARRAY, item]
        nptype = self.gguf_scalar_to_np.get(item)
        if nptype is None:  # nested arrays: rare, let the package walk them
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, nptype, int(length[0]))
        return offs + int(values.nbytes) - orig_offs, [item_type, length, values], [2], [GGUFValueType.ARRAY, item]


@dataclass
class TensorInfo:
    name: str
    type: str  # ggml type name: F32, F16, Q4_K, ...
    bytes: int
    offset: int  # absolute position in the file
    shape: list[int]  # ggml order: shape[0] is the row length
    layer: int | None  # N of blk.N, None for token_embd, output...
    expert: bool  # an ffn_*_exps tensor: each token reads only n_expert_used of n_expert
    shard: int = 0  # the file of a split model that holds it (0-based); offset is in that file


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
    n_ff: int | None  # the largest, when it varies per layer
    n_head: list[int]  # per layer
    n_head_kv: list[int]  # per layer
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    sliding_window: int | None
    swa_layers: list[int]
    n_expert: int
    n_expert_used: int
    n_ff_expert: int | None  # an expert's FFN width (expert_feed_forward_length), else n_ff
    has_chat_template: bool
    tied_embeddings: bool
    quantization_mix: dict[str, int]  # tensor type name -> bytes
    layer_bytes: list[int]  # weights of each blk.N
    layer_expert_bytes: list[int]  # the part of layer_bytes in ffn_*_exps tensors
    embedding_bytes: int  # token_embd.*
    output_bytes: int  # output.* and output_norm.*
    other_bytes: int  # tensors outside the layers, the embedding and the output (rope_freqs, ...)
    shards: int = 1  # files of a split model; path is the first, which llama.cpp loads the set from
    shard_paths: list[str] = field(default_factory=list)  # every file, in order; file_size is their total
    tensors: list[TensorInfo] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["tensors"]  # thousands of rows: callers that need them use the object
        return data


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    item = reader.fields.get(key)
    if item is None:
        return default
    if item.types and item.types[0] == GGUFValueType.ARRAY and item.types[-1] == GGUFValueType.STRING:
        return default  # _HeaderReader kept only the length of string arrays
    return item.contents()


def _string_array_length(reader: GGUFReader, key: str) -> int:
    item = reader.fields.get(key)
    return int(item.parts[-1][0]) if item is not None else 0  # the length _HeaderReader kept


def _per_layer(value: Any, n_layer: int, name: str) -> list[int]:
    if value is None:
        raise GGUFError(f"the GGUF has no {name}; it may be damaged or from an unsupported converter")
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GGUFError(f"{name} lists {len(value)} values for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def swa_layout(arch: str, n_layer: int, window: Any, pattern: Any) -> tuple[int | None, list[int]]:
    """The sliding window and the layers that use it, as llama.cpp decides them.

    `pattern` is the file's attention.sliding_window_pattern: a per-layer flag list, or a period
    that replaces the architecture's default.
    """
    if arch not in SWA_RULES:
        return None, []
    period, default_window = SWA_RULES[arch]
    window = int(window) if window is not None else default_window
    if not window:
        return None, []
    if isinstance(pattern, list):
        flags = [bool(pattern[i % len(pattern)]) for i in range(n_layer)] if pattern else [False] * n_layer
        return window, [i for i, flag in enumerate(flags) if flag]
    if pattern is not None:
        period = int(pattern)
    return window, [i for i in range(n_layer) if period == 0 or i % period < period - 1]


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GGUFError(f"{path} is not a file; give the path of a .gguf model")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a readable GGUF file (it does not start with GGUF): pick a .gguf model file")
    try:
        return _HeaderReader(str(path), "r")
    except Exception as exc:  # the gguf package raises ValueError, struct errors, IndexError...
        raise GGUFError(
            f"{path} is not a readable GGUF file ({exc}): it may be truncated by an interrupted download, "
            "or damaged; download it again"
        ) from None


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """The model in `path`, or in the split set that `path` is any file of: the metadata of its
    first file, the tensors, parameters and bytes of all of them (see gguf_split)."""
    try:
        shards = gguf_split.set_readers(Path(path), _open(Path(path)), _open)
    except gguf_split.SplitSetError as exc:
        raise GGUFError(str(exc)) from None
    path, reader = shards[0]
    arch = _field(reader, "general.architecture")
    if not arch:
        raise GGUFError(f"{path} has no general.architecture: it is not a language model GGUF")
    n_layer = int(_field(reader, f"{arch}.block_count", 0))
    if n_layer <= 0:
        raise GGUFError(f"{path} has no {arch}.block_count: it is not a language model GGUF")
    n_embd = int(_field(reader, f"{arch}.embedding_length", 0))
    n_head = _per_layer(_field(reader, f"{arch}.attention.head_count"), n_layer, "attention.head_count")
    n_head_kv = _per_layer(_field(reader, f"{arch}.attention.head_count_kv", n_head), n_layer, "attention.head_count_kv")
    head_dim = n_embd // max(max(n_head), 1)
    n_ff = _field(reader, f"{arch}.feed_forward_length")
    n_vocab = int(_field(reader, f"{arch}.vocab_size", 0)) or _string_array_length(reader, "tokenizer.ggml.tokens")
    window, swa_layers = swa_layout(
        arch,
        n_layer,
        _field(reader, f"{arch}.attention.sliding_window"),
        _field(reader, f"{arch}.attention.sliding_window_pattern"),
    )

    tensors = []
    for shard, (_, shard_reader) in enumerate(shards):
        for tensor in shard_reader.tensors:
            layer = _LAYER.match(tensor.name)
            tensors.append(
                TensorInfo(
                    tensor.name,
                    tensor.tensor_type.name,
                    int(tensor.n_bytes),
                    int(tensor.data_offset),
                    [int(n) for n in tensor.shape],
                    int(layer.group(1)) if layer else None,
                    bool(_EXPERTS.match(tensor.name)),
                    shard,
                )
            )
    layer_bytes, layer_expert_bytes = [0] * n_layer, [0] * n_layer
    mix: dict[str, int] = defaultdict(int)
    embedding = output = other = 0
    for info in tensors:
        mix[info.type] += info.bytes
        if info.layer is not None and info.layer < n_layer:
            layer_bytes[info.layer] += info.bytes
            if info.expert:
                layer_expert_bytes[info.layer] += info.bytes
        elif info.name.startswith("token_embd."):
            embedding += info.bytes
        elif info.name.startswith(("output.", "output_norm.")):
            output += info.bytes
        else:
            other += info.bytes
    file_type = _field(reader, "general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    return GGUFInfo(
        path=str(path),
        file_size=sum(shard_path.stat().st_size for shard_path, _ in shards),
        architecture=str(arch),
        name=_field(reader, "general.name"),
        file_type=file_type_name,
        parameters=sum(int(t.n_elements) for _, shard_reader in shards for t in shard_reader.tensors),
        n_layer=n_layer,
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 0)),
        n_embd=n_embd,
        n_ff=int(max(n_ff) if isinstance(n_ff, list) else n_ff) if n_ff is not None else None,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(_field(reader, f"{arch}.attention.key_length", head_dim)),
        head_dim_v=int(_field(reader, f"{arch}.attention.value_length", head_dim)),
        n_vocab=n_vocab,
        sliding_window=window,
        swa_layers=swa_layers,
        n_expert=int(_field(reader, f"{arch}.expert_count", 0)),
        n_expert_used=int(_field(reader, f"{arch}.expert_used_count", 0)),
        n_ff_expert=int(_field(reader, f"{arch}.expert_feed_forward_length", 0)) or None,
        has_chat_template="tokenizer.chat_template" in reader.fields,
        tied_embeddings="output.weight" not in {t.name for t in tensors},
        quantization_mix=dict(mix),
        layer_bytes=layer_bytes,
        layer_expert_bytes=layer_expert_bytes,
        embedding_bytes=embedding,
        output_bytes=output,
        other_bytes=other,
        shards=len(shards),
        shard_paths=[str(shard_path) for shard_path, _ in shards],
        tensors=tensors,
    )


@functools.lru_cache(maxsize=32)
def _inspect_cached(path: str, files: tuple[tuple[str, int, int], ...]) -> GGUFInfo:
    return inspect_gguf(path)


def inspect_cached(path: str | Path) -> GGUFInfo:
    """inspect_gguf, remembered while the file is unchanged (GGUFReader parses the whole vocabulary),
    and for a split model while every file named as one of its set is (one added or removed too)."""
    path = Path(path)
    name = gguf_split.split_name(path)
    files = sorted({path, *gguf_split.same_prefix(name)}) if name else [path]
    return _inspect_cached(str(path), tuple((str(file), *_stamp(file)) for file in files))


def _stamp(file: Path) -> tuple[int, int]:
    """What changes when a file does: its mtime and size; (-1, -1) for a missing one (inspect_gguf says so)."""
    try:
        stat = file.stat()
    except FileNotFoundError:
        return -1, -1
    return stat.st_mtime_ns, stat.st_size


def quant_name(file_type: str | None) -> str:
    """The quantization as model cards name it: Q4_K_M for MOSTLY_Q4_K_M, F32 for ALL_F32, "?" if unknown."""
    if not file_type or file_type == "GUESSED":
        return "?"
    return file_type.removeprefix("MOSTLY_").removeprefix("ALL_")


# A quantization in a file or folder name, as llama.cpp's quantize and model cards spell it:
# Q4_K_M, Q8_0, IQ4_XS, IQ2_XXS, TQ1_0, F16, BF16, MXFP4_MOE...
_QUANT_IN_NAME = re.compile(r"(?<![a-z0-9])((?:i?q|tq)\d(?:_[a-z0-9]{1,3})*|b?f16|f32|mxfp4(?:_moe)?)(?![a-z0-9])", re.I)


def quant_in_name(path: str) -> str | None:
    """The quantization a file's path in a repo names (Model-Q4_K_M.gguf, Q4_K_M/Model-00001-of-00002.gguf),
    upper case; None if it names none. The file name first, then its folders; in each the last
    match, since a model's own name comes first (Qwen3-4B-Instruct-2507-Q8_0)."""
    for part in reversed(Path(path).parts):
        if found := _QUANT_IN_NAME.findall(part):
            return str(found[-1]).upper()
    return None
