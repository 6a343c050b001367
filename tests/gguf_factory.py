"""Tiny GGUF files with random weights, written with the gguf package.

They load in milliseconds and generate (meaningless) tokens, so the daemon, the engine and the
planner can be tested with real files of varied shapes: layer count, GQA, vocabulary size, tied
embeddings, quantized weights, mixture-of-experts layers, and (gemma2, gemma3) sliding-window
layers. `split_gguf` splits any GGUF, a real quantized one included, as llama.cpp names and
numbers a split model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_vocab: int = 320
    n_ctx_train: int = 2048
    tied_embeddings: bool = False
    f16: bool = False
    chat_template: str | None = CHATML_TEMPLATE
    seed: int = 0
    quant: str | None = None  # "Q8_0" or "Q4_0": the weight matrices quantized with gguf.quants
    n_expert: int = 0  # > 0: mixture-of-experts FFN (ffn_*_exps tensors) instead of a dense one
    n_expert_used: int = 2
    file_type: str | None = None  # general.file_type by name (e.g. "MOSTLY_Q4_K_M"), else from the weights


def _vocabulary(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece-style vocabulary: 3 specials, 256 byte tokens, then filler words."""
    if n_vocab < 3 + 256 + 1:
        raise ValueError("n_vocab must be at least 260 (3 specials + 256 bytes + 1 word)")
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    # NORMAL, not BYTE: a random model picks byte tokens at random, and the invalid UTF-8 they
    # would decode to makes llama-cpp-python's streaming rescan its held-back text every token
    # (400 tokens took 9 s). As NORMAL they decode to the literal text "<0xC3>", and the
    # tokenizer still finds them by name for any byte of a prompt.
    types += [TokenType.NORMAL] * 256
    n_words = n_vocab - len(tokens)
    tokens += [("\u2581w" + str(i)).encode() for i in range(n_words)]
    types += [TokenType.NORMAL] * n_words
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(n_words)]
    return tokens, scores, [int(t) for t in types]


def _add_tokenizer(writer: GGUFWriter, n_vocab: int) -> None:
    tokens, scores, types = _vocabulary(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def _add_llama_shape(writer: GGUFWriter, spec: TinyModelSpec | RandomLlamaSpec) -> None:
    """The llama hyperparameters both writers set, from the spec's fields of the same names."""
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(spec.n_vocab)


def write_tiny_llama(path: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a llama GGUF for `spec` to `path` and return the path."""
    if spec.n_embd % spec.n_head or spec.n_head % spec.n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    rng = np.random.default_rng(spec.seed)
    dtype = np.float16 if spec.f16 else np.float32
    head_dim = spec.n_embd // spec.n_head

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(dtype)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)  # norms stay f32, as llama.cpp's converters write them

    def add_weight(name: str, *shape: int) -> None:
        """A weight matrix, quantized when the spec asks (rows must be a multiple of 32)."""
        data = weight(*shape)
        if spec.quant is None:
            writer.add_tensor(name, data)
            return
        qtype = GGMLQuantizationType[spec.quant]
        writer.add_tensor(name, quantize(data.astype(np.float32), qtype), raw_dtype=qtype)

    file_type = {"Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0}.get(
        spec.quant or "", LlamaFileType.MOSTLY_F16 if spec.f16 else LlamaFileType.ALL_F32
    )
    if spec.file_type is not None:
        file_type = LlamaFileType[spec.file_type]
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-llama-{spec.n_layer}L-{spec.n_embd}d-kv{spec.n_head_kv}")
    writer.add_file_type(file_type)
    _add_llama_shape(writer, spec)
    if spec.n_expert:
        writer.add_expert_count(spec.n_expert)
        writer.add_expert_used_count(spec.n_expert_used)

    _add_tokenizer(writer, spec.n_vocab)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)

    add_weight("token_embd.weight", spec.n_vocab, spec.n_embd)
    writer.add_tensor("output_norm.weight", norm(spec.n_embd))
    if not spec.tied_embeddings:
        add_weight("output.weight", spec.n_vocab, spec.n_embd)
    for i in range(spec.n_layer):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm(spec.n_embd))
        add_weight(f"{block}.attn_q.weight", spec.n_head * head_dim, spec.n_embd)
        add_weight(f"{block}.attn_k.weight", spec.n_head_kv * head_dim, spec.n_embd)
        add_weight(f"{block}.attn_v.weight", spec.n_head_kv * head_dim, spec.n_embd)
        add_weight(f"{block}.attn_output.weight", spec.n_embd, spec.n_head * head_dim)
        writer.add_tensor(f"{block}.ffn_norm.weight", norm(spec.n_embd))
        if spec.n_expert:
            writer.add_tensor(f"{block}.ffn_gate_inp.weight", weight(spec.n_expert, spec.n_embd).astype(np.float32))
            add_weight(f"{block}.ffn_gate_exps.weight", spec.n_expert, spec.n_ff, spec.n_embd)
            add_weight(f"{block}.ffn_up_exps.weight", spec.n_expert, spec.n_ff, spec.n_embd)
            add_weight(f"{block}.ffn_down_exps.weight", spec.n_expert, spec.n_embd, spec.n_ff)
        else:
            add_weight(f"{block}.ffn_gate.weight", spec.n_ff, spec.n_embd)
            add_weight(f"{block}.ffn_up.weight", spec.n_ff, spec.n_embd)
            add_weight(f"{block}.ffn_down.weight", spec.n_embd, spec.n_ff)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_gemma2(path: Path, n_layer: int = 4, window: int = 128, seed: int = 0) -> Path:
    """A gemma2 GGUF: every other layer attends through a sliding window of `window` tokens."""
    return write_tiny_gemma(path, "gemma2", n_layer, window, seed)


def write_tiny_gemma(
    path: Path, arch: str = "gemma2", n_layer: int = 4, window: int = 128, seed: int = 0, n_vocab: int = 320
) -> Path:
    """A gemma2 or gemma3 GGUF with tied embeddings and sliding-window layers.

    llama.cpp's default pattern: gemma2 alternates windowed and global layers, gemma3 makes every
    sixth layer global.
    """
    if arch not in ("gemma2", "gemma3"):
        raise ValueError(f"no tiny {arch}: gemma2 or gemma3")
    rng = np.random.default_rng(seed)
    n_embd, n_head, n_head_kv, n_ff = 64, 4, 2, 128
    head_dim = n_embd // n_head

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    writer = GGUFWriter(str(path), arch)
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    _add_tokenizer(writer, n_vocab)
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))  # tied: gemma has no output.weight
    writer.add_tensor("output_norm.weight", ones(n_embd))
    for i in range(n_layer):
        block = f"blk.{i}"
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            writer.add_tensor(f"{block}.{norm}.weight", ones(n_embd))
        if arch == "gemma3":
            writer.add_tensor(f"{block}.attn_q_norm.weight", ones(head_dim))
            writer.add_tensor(f"{block}.attn_k_norm.weight", ones(head_dim))
        writer.add_tensor(f"{block}.attn_q.weight", weight(n_head * head_dim, n_embd))
        writer.add_tensor(f"{block}.attn_k.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"{block}.attn_v.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"{block}.attn_output.weight", weight(n_embd, n_head * head_dim))
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ggml's block layouts (ggml-common.h): weights per block, bytes per block, and the offsets of the
# block's f16 scales (d, and dmin or m). Every other byte is quantized weights or sub-block scales,
# which may hold any value.
BLOCK_LAYOUTS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "Q4_0": (32, 18, (0,)),
    "Q4_1": (32, 20, (0, 2)),
    "Q5_0": (32, 22, (0,)),
    "Q5_1": (32, 24, (0, 2)),
    "Q8_0": (32, 34, (0,)),
    "Q2_K": (256, 84, (80, 82)),
    "Q3_K": (256, 110, (108,)),
    "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)),
    "Q6_K": (256, 210, (208,)),
}


@dataclass(frozen=True)
class RandomLlamaSpec:
    """A llama of random quantized weights; the defaults make a ~1 GB Q4_0 file (1.8B weights)."""

    quant: str = "Q4_0"  # a BLOCK_LAYOUTS type, or F16
    n_layer: int = 27
    n_embd: int = 2048
    n_head: int = 16
    n_head_kv: int = 4
    n_ff: int = 8192
    n_vocab: int = 32000
    n_ctx_train: int = 4096
    tied_embeddings: bool = False  # no output.weight: the output reads token_embd
    embedding_quant: str | None = None  # token_embd's type, when not `quant` (SmolLM2's is Q8_0)
    seed: int = 0


def layer_matrices(spec: RandomLlamaSpec) -> list[tuple[str, int, int]]:
    """(name, rows, columns) of each weight matrix of one llama layer of `spec`."""
    kv = spec.n_head_kv * (spec.n_embd // spec.n_head)
    return [
        ("attn_q", spec.n_embd, spec.n_embd),
        ("attn_k", kv, spec.n_embd),
        ("attn_v", kv, spec.n_embd),
        ("attn_output", spec.n_embd, spec.n_embd),
        ("ffn_gate", spec.n_ff, spec.n_embd),
        ("ffn_up", spec.n_ff, spec.n_embd),
        ("ffn_down", spec.n_embd, spec.n_ff),
    ]


def write_random_llama(path: Path, spec: RandomLlamaSpec = RandomLlamaSpec()) -> Path:
    """Write a llama GGUF of random quantized matrices, in seconds even at several GB.

    Quantizing with gguf.quants takes minutes per GB (and it cannot write K-quants), so each block
    is random bytes with its f16 scales set to a small fixed value. The output row of the
    end-of-generation token is zero, so greedy decoding does not end a reply early.
    """
    block = BLOCK_LAYOUTS.get(spec.quant, (256, 0, ()))[0]
    if spec.quant not in (*BLOCK_LAYOUTS, "F16"):
        raise ValueError(f"no random {spec.quant}: use F16 or one of {', '.join(BLOCK_LAYOUTS)}")
    if spec.n_embd % spec.n_head or spec.n_head % spec.n_head_kv or spec.n_embd % block or spec.n_ff % block:
        raise ValueError(f"n_embd must divide by n_head and by {block}, n_head by n_head_kv, and n_ff by {block}")
    rng = np.random.default_rng(spec.seed)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)

    def matrix(rows: int, cols: int, quant: str = spec.quant) -> np.ndarray:
        if quant == "F16":
            return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)
        per_block, size, scales = BLOCK_LAYOUTS[quant]
        n = cols // per_block
        blocks = np.frombuffer(rng.bytes(rows * n * size), dtype=np.uint8).reshape(rows, n, size).copy()
        for at in scales:
            blocks[:, :, at : at + 2] = scale
        return blocks.reshape(rows, n * size)

    def add(name: str, data: np.ndarray, quant: str = spec.quant) -> None:
        writer.add_tensor(name, data, raw_dtype=None if quant == "F16" else GGMLQuantizationType[quant])

    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"random-{spec.quant}-llama-{spec.n_layer}L-{spec.n_embd}d")
    file_type = {"Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M"}.get(
        spec.quant, f"MOSTLY_{spec.quant}"
    )
    writer.add_file_type(LlamaFileType[file_type])
    _add_llama_shape(writer, spec)
    _add_tokenizer(writer, spec.n_vocab)
    writer.add_chat_template(CHATML_TEMPLATE)

    embedding_quant = spec.embedding_quant or spec.quant
    embedding = matrix(spec.n_vocab, spec.n_embd, embedding_quant)
    writer.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    output = embedding if spec.tied_embeddings else matrix(spec.n_vocab, spec.n_embd)
    output[2] = 0  # </s>: a logit of 0, below the largest of the others
    add("token_embd.weight", embedding, embedding_quant)
    if not spec.tied_embeddings:
        add("output.weight", output)
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        for name, rows, cols in layer_matrices(spec):
            add(f"{blk}.{name}.weight", matrix(rows, cols))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_llama(cache: Path, spec: RandomLlamaSpec = RandomLlamaSpec()) -> Path:
    """The file for `spec` in `cache`, written the first time (benchmark runs share it)."""
    s = spec
    tied = f"-tied{s.embedding_quant or ''}" if s.tied_embeddings else ""
    path = (
        cache
        / f"random-{s.quant}-{s.n_layer}L-{s.n_embd}d-{s.n_ff}ff-{s.n_head}h{s.n_head_kv}kv-{s.n_vocab}v{tied}-s{s.seed}.gguf"
    )
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write_random_llama(partial, spec)
        partial.rename(path)
    return path


def split_gguf(source: Path, destination: Path, n_shards: int) -> list[Path]:
    """Split the GGUF `source` into `n_shards` files, written by the gguf package's own writer
    (`split_max_tensors`), and return their paths in order.

    They are named and numbered as llama.cpp's gguf-split does it: `destination` without .gguf,
    then -00001-of-00003.gguf; the writer puts split.no, split.count and split.tensors.count in
    each file and the metadata in the first. The metadata and every tensor's bytes are copied
    as they are, so a quantized model stays exactly the model it was.
    """
    reader = GGUFReader(source)
    per_file = math.ceil(len(reader.tensors) / n_shards)
    if n_shards < 2 or math.ceil(len(reader.tensors) / per_file) != n_shards:
        raise ValueError(f"{source.name} has {len(reader.tensors)} tensors: it cannot be split into {n_shards} files of them")
    architecture = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(destination, architecture, split_max_tensors=per_file)
    writer.data_alignment = reader.alignment
    copy_gguf(reader, writer, lambda name: None if name.startswith("split.") else name)  # the writer adds split.*
    stem = destination.name.removesuffix(".gguf")
    return [destination.with_name(f"{stem}-{no:05d}-of-{n_shards:05d}.gguf") for no in range(1, n_shards + 1)]


def copy_gguf(reader: GGUFReader, writer: GGUFWriter, key: Callable[[str], str | None]) -> None:
    """Write every metadata key of `reader` under the name `key` gives it (None leaves it out), then
    every tensor's bytes as they are, and close `writer`. The header's own fields and
    general.architecture are the writer's."""
    for item in reader.fields.values():
        name = None if item.name.startswith("GGUF.") or item.name == "general.architecture" else key(item.name)
        if name is not None:
            sub_type = item.types[-1] if item.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, item.contents(), item.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
