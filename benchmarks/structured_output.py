"""Decode speed with a JSON schema's grammar against without, on the demo model, in-process.

Both go through the engine's own code (daemon/llama/tools.py's reply_for, ChatModel), with the
same prompt, sampling and seeds, alternating so that a change of machine load hits both alike.
The grammar is checked last, as llama.cpp's server does it (daemon/llama/grammar_sampling.py):
on the token drawn, and over the whole vocabulary only when that token breaks it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from benchmarks.common import CPUS, demo_model, target
from vramchat.daemon.llama import tools
from vramchat.daemon.llama.chat_model import ChatModel
from vramchat.daemon.llama.grammar import schema_grammar

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "species": {"enum": ["cat", "dog", "parrot"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer"}, "verified": {"type": "boolean"}},
            "required": ["age", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "species", "tags", "owner"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON, with its name, species, tags and owner."}]


def decode(model: ChatModel, seed: int, max_tokens: int, grammar: str | None) -> tuple[float, int, str]:
    """Tokens per second after the first token, tokens generated, and the text."""
    prompt = model.fitted_prompt(MESSAGES, overflow="error", dropped=0, reply_room=max_tokens)
    model.llm.set_seed(seed)
    reply = tools.reply_for(model, prompt, {"temperature": 1.0, "max_tokens": max_tokens}, {"grammar": grammar})
    text = "".join(reply)
    ended = time.monotonic()
    assert reply.first_token_at is not None
    return (reply.generated - 1) / (ended - reply.first_token_at), reply.generated, text


def run(quick: bool = False) -> dict[str, Any]:
    rounds, max_tokens = (1, 32) if quick else (8, 160)
    started = time.perf_counter()
    grammar = schema_grammar(SCHEMA, strict=True)
    build_ms = 1000 * (time.perf_counter() - started)
    model = ChatModel.load(str(demo_model()), n_gpu_layers=0, n_ctx=2048, n_threads=CPUS)
    decode(model, 0, 8, None)  # warm the caches
    free: list[float] = []
    bound: list[float] = []
    free_tokens: list[int] = []
    bound_tokens: list[int] = []
    valid = 0
    for seed in range(rounds):
        for constrained in (seed % 2 == 0, seed % 2 == 1):  # alternate which goes first
            speed, tokens, text = decode(model, seed, max_tokens, grammar if constrained else None)
            (bound if constrained else free).append(speed)
            (bound_tokens if constrained else free_tokens).append(tokens)
            if constrained:
                valid += is_valid(text) if not quick else 1
    ratio = statistics.median(bound) / statistics.median(free)
    return {
        "name": "structured output: tokens per second with a JSON schema against without",
        "settings": {
            "model": demo_model().name,
            "runs each": rounds,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "measured": "in-process, the engine's reply code, alternating",
            "threads": CPUS,
        },
        "grammar_build_ms": build_ms,
        "tokens_per_s_without_schema": statistics.median(free),
        "tokens_per_s_with_schema": statistics.median(bound),
        "with_over_without": ratio,
        "mean_tokens_without_schema": statistics.mean(free_tokens),
        "mean_tokens_with_schema": statistics.mean(bound_tokens),
        "replies_valid": valid,
        "targets": [
            target(
                "with_over_without",
                ">= 0.5",
                ratio >= 0.5,
                "a drawn token that breaks the grammar costs a second pass over the whole vocabulary",
            )
        ],
    }


def is_valid(text: str) -> int:
    """1 if `text` is JSON of SCHEMA's shape (the tests validate with jsonschema; a benchmark needs no dev dependency)."""
    try:
        value = json.loads(text)
    except ValueError:
        return 0
    return int(isinstance(value, dict) and set(value) == set(SCHEMA["required"]) and value["species"] in ("cat", "dog", "parrot"))


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
