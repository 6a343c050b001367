"""Sampling under a grammar as llama.cpp's own common sampler does it: grammar last.

llama-cpp-python puts the grammar in the sampler chain before top-k, so it checks every token of
the vocabulary (49k for SmolLM2) at every step: half the decode speed of a small model
(docs/benchmarks.md). llama.cpp's common_sampler_sample samples without the grammar first and
checks only the token it drew; only when the grammar refuses that token does it apply the grammar
to the whole vocabulary and sample again. The result obeys the grammar either way.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp
import numpy as np

from vramchat.daemon.llama.grammar import GrammarDeadEnd

TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class GrammarLastSampler:
    """Stands in for llama-cpp-python's LlamaSampler (its `sample(ctx, idx)`), wrapping the chain
    that Llama._init_sampler built without a grammar."""

    def __init__(self, llm: Any, chain: Any, grammar: str) -> None:
        self.chain = chain  # kept alive: it owns the native chain
        self.grammar = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
        if not self.grammar:
            raise ValueError("llama.cpp cannot parse the grammar")
        self.n_vocab = int(llm.n_vocab())
        self.ids = np.arange(self.n_vocab, dtype=np.intc)
        self.candidates = np.zeros(self.n_vocab, dtype=TOKEN_DATA)

    def _all(self, logits: Any) -> llama_cpp.llama_token_data_array:
        """Every token with its logit, as a fresh array (samplers may move its data pointer)."""
        self.candidates["id"] = self.ids
        self.candidates["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self.candidates["p"] = 0.0
        data = self.candidates.ctypes.data_as(llama_cpp.llama_token_data_p)
        return llama_cpp.llama_token_data_array(data=data, size=self.n_vocab, selected=-1, sorted=False)

    def _chain_pick(self, candidates: llama_cpp.llama_token_data_array) -> int:
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def _allowed(self, token: int) -> bool:
        one = llama_cpp.llama_token_data(token, 1.0, 0.0)
        single = llama_cpp.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(single))
        return not math.isinf(single.data[0].logit)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        logits = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        token = self._chain_pick(self._all(logits))
        if not self._allowed(token):
            candidates = self._all(logits)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
            if not np.isfinite(self.candidates["logit"]).any():  # llama.cpp would abort on any pick
                raise GrammarDeadEnd(
                    "no token of this model's vocabulary can continue the text the grammar allows; "
                    "the model cannot write this schema"
                )
            token = self._chain_pick(candidates)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain.sampler, token)
        return token

    def close(self) -> None:
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        self.chain.close()

    def __del__(self) -> None:
        self.close()


@contextmanager
def grammar_last(llm: Any, grammar: str) -> Iterator[None]:
    """While it lasts, `llm.generate(..., grammar=None)` samples under `grammar`, grammar last."""
    build_chain: Callable[..., Any] = llm._init_sampler
    llm._init_sampler = lambda **settings: GrammarLastSampler(llm, build_chain(**settings), grammar)
    try:
        yield
    finally:
        del llm._init_sampler  # the class's own again
