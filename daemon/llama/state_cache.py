"""The KV state of recently used conversations, kept in the engine's RAM (`state_cache_mib`).

The context holds one conversation at a time; this is what spares going back to another one from
evaluating its whole history again (docs/benchmarks.md, resume_conversation).
"""

from __future__ import annotations

import collections
import ctypes
from dataclasses import dataclass
from typing import Any


@dataclass
class SavedState:
    tokens: list[int]
    kv: Any  # ctypes uint8 array from llama_state_seq_get_data

    @property
    def size(self) -> int:
        return len(self.kv)


class ConversationStates:
    """The KV cache of recently used conversations, kept in RAM within a byte budget.

    The context holds one conversation at a time. Without this, switching back to a
    conversation re-evaluates its whole history, which takes minutes on a CPU-bound 70B model.
    Least recently used entries are dropped first.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.entries: collections.OrderedDict[str, SavedState] = collections.OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(entry.size for entry in self.entries.values())

    def save(self, key: str, llm: Any, llama_cpp: Any) -> None:
        if llm.n_tokens == 0:
            return
        ctx = llm._ctx.ctx
        size = int(llama_cpp.llama_state_seq_get_size(ctx, 0))
        if size > self.budget_bytes:
            return
        self.entries.pop(key, None)
        while self.entries and self.used_bytes + size > self.budget_bytes:
            self.entries.popitem(last=False)
        kv = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, kv, size, 0) != size:
            return
        self.entries[key] = SavedState(tokens=llm.input_ids[: llm.n_tokens].tolist(), kv=kv)

    def restore(self, key: str | None, llm: Any, llama_cpp: Any, prompt: list[int]) -> int:
        """Put a saved conversation back in the context if it shares more of `prompt` than the
        context does now; returns the number of prompt tokens that need no evaluation."""
        current = _common_prefix(prompt, llm.input_ids[: llm.n_tokens].tolist())
        entry = self.entries.get(key) if key else None
        if key is None or entry is None or _common_prefix(prompt, entry.tokens) <= current:
            return current
        self.entries.move_to_end(key)
        ctx = llm._ctx.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        if llama_cpp.llama_state_seq_set_data(ctx, entry.kv, entry.size, 0) == 0:
            llm.n_tokens = 0  # the context is empty now; generate() evaluates everything
            return 0
        llm.input_ids[: len(entry.tokens)] = entry.tokens
        llm.n_tokens = len(entry.tokens)
        llm._requires_eval = True  # the restored KV carries no logits: evaluate at least one token
        return _common_prefix(prompt, entry.tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
