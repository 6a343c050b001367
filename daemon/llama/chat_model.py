"""A `llama_cpp.Llama` with its chat template, and the token loop of one reply.

The engine (engine.py) serves it over its socket; the benchmarks load and run it in-process
through the same code, so "direct llama-cpp-python" in docs/benchmarks.md means exactly this.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vramchat.daemon.llama import params as llama_params
from vramchat.shared import thinking

# Plain ChatML, for models whose GGUF carries no chat template (the tiny test models, some
# base models). llama-cpp-python would fall back to the llama-2 format instead.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_STOP = ["<|im_end|>"]

SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "max_tokens": 1024,
    "seed": None,
}


@dataclass
class Prompt:
    tokens: list[int]
    stops: list[str]  # the reply ends where one of these appears
    dropped: int = 0  # messages after the system prompt left out to make it fit
    # The template opened the reply's reasoning block itself (DeepSeek-R1's ends the prompt with
    # "<think>\n"): the model's text starts inside it, so the engine stores the opening with it.
    opens_thinking: bool = False


class PromptTooLong(Exception):
    pass


class ChatModel:
    """A loaded model that formats conversations with its own chat template (ChatML without one)."""

    def __init__(self, llm: Any) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        self._llama_params: list[Any] = []  # what llama.cpp's model params point to (params.py)
        template = llm.metadata.get("tokenizer.chat_template")
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template or FALLBACK_CHAT_TEMPLATE,
            eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        self.chat_template = "gguf" if template else "chatml (fallback: the GGUF has none)"
        self._extra_stops = [] if template else FALLBACK_STOP
        self.n_ctx: int = llm.n_ctx()
        vocab = llm._model.vocab
        self._is_end_of_generation = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    @classmethod
    def load(
        cls,
        model_path: str,
        *,
        n_gpu_layers: int,
        n_ctx: int,
        n_threads: int | None,
        cpu_tensors: Sequence[str] = (),
        flash_attn_auto: bool = False,
        on_progress: Callable[[float], None] = lambda fraction: None,
        **llama_args: Any,
    ) -> ChatModel:
        """Load the GGUF (mmapped unless use_mmap=False), with `llama_args` passed on to Llama()
        (shared/load_options.py builds them from a load's settings), and the tensors matching
        `cpu_tensors` kept in RAM (daemon/llama/params.py). Raises what llama-cpp-python raises,
        mostly ValueError."""
        from llama_cpp import Llama

        with llama_params.model_params(on_progress, cpu_tensors, flash_attn_auto=flash_attn_auto) as keep:
            llm = Llama(
                model_path=model_path,
                n_gpu_layers=n_gpu_layers,
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
                **llama_args,
            )
        model = cls(llm)
        model._llama_params = keep
        return model

    @property
    def template_knows_tools(self) -> bool:
        """Whether the chat template renders `tools` itself (as llama.cpp's minja decides it)."""
        return "tools" in self.formatter.template

    def prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Prompt:
        """The conversation formatted and tokenized as the model was trained to read it; `tools`
        are passed to the template (daemon/llama/tools.py decides when)."""
        formatted = self.formatter(messages=messages, tools=tools)  # type: ignore[arg-type]  # role/content dicts are what it reads
        tokens = self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)
        stops = formatted.stop if isinstance(formatted.stop, list) else ([formatted.stop] if formatted.stop else [])
        opens_thinking = formatted.prompt.rstrip().endswith(thinking.OPEN)
        return Prompt(tokens, stops + self._extra_stops, opens_thinking=opens_thinking)

    def fitted_prompt(
        self,
        messages: list[dict[str, Any]],
        *,
        overflow: str,
        dropped: int,
        reply_room: int,
        tools: list[dict[str, Any]] | None = None,
    ) -> Prompt:
        """The prompt for `messages` with room for `reply_room` tokens of reply, or PromptTooLong.

        With overflow "drop_oldest" the oldest messages after the system prompt are left out,
        never the last one. At least the `dropped` that the conversation's previous reply left
        out stay out, so that this prompt extends the previous one and its KV cache is reused.
        When more must go, enough go to halve the window, so that the next turns extend this
        prompt in turn: one re-evaluation every few turns, as llama.cpp's context shift does.
        """
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        history = messages[len(system) :]
        # The old hard error needs only one free cell; dropping keeps room for a whole reply.
        limit = self.n_ctx - (reply_room if overflow == "drop_oldest" else 1)

        def without(first: int) -> Prompt:
            prompt = self.prompt(system + history[first:], tools)
            prompt.dropped = first
            return prompt

        whole = without(0)
        if len(whole.tokens) <= limit:
            return whole
        if overflow != "drop_oldest" or len(history) < 2:
            raise PromptTooLong(self._too_long(len(whole.tokens), overflow))
        first = min(max(dropped, 0), len(history) - 1)
        prompt = without(first)
        if len(prompt.tokens) <= limit:
            return prompt
        while first < len(history) - 1 and (len(prompt.tokens) > limit or len(prompt.tokens) > self.n_ctx // 2):
            first += 1
            while first < len(history) - 1 and history[first]["role"] != "user":  # the view opens on a question
                first += 1
            prompt = without(first)
        if len(prompt.tokens) > limit:
            raise PromptTooLong(self._too_long(len(prompt.tokens), overflow))
        return prompt

    def _too_long(self, tokens: int, overflow: str) -> str:
        if overflow == "drop_oldest":
            return (
                f"the conversation is {tokens} tokens and the context window is {self.n_ctx}, even with only the "
                "last message: shorten the message, or load the model with a larger context (--ctx)."
            )
        return (
            f"the conversation is {tokens} tokens and the context window is {self.n_ctx}. Start a new conversation, "
            "shorten the message, load the model with a larger context (--ctx), or let the oldest messages go "
            '(the conversation setting context_overflow = "drop_oldest").'
        )

    def reply(self, prompt: Prompt, sampling: dict[str, Any], grammar: str | None = None) -> Reply:
        """A reply to `prompt`; `sampling` overrides SAMPLING_DEFAULTS; `grammar` (GBNF) constrains it."""
        return Reply(self, prompt, {**SAMPLING_DEFAULTS, **sampling}, grammar)


class Reply:
    """Iterating it generates: one text piece per token ("" while a token shows nothing yet).

    `stop()` between two pieces ends it after the current token; `finish_reason` says why it
    ended: "stop" (end of generation or a stop string), "length" or "cancelled".
    """

    def __init__(self, model: ChatModel, prompt: Prompt, sampling: dict[str, Any], grammar: str | None = None) -> None:
        self.model, self.prompt, self.sampling, self.grammar = model, prompt, sampling, grammar
        self.max_tokens = min(int(sampling["max_tokens"]), model.n_ctx - len(prompt.tokens))  # what the context has room for
        self.generated = 0
        self.first_token_at: float | None = None
        self.finish_reason = "length"
        self.text_out = StopFilter(prompt.stops)
        self._stop_requested = False

    def stop(self) -> None:
        self._stop_requested = True

    def __iter__(self) -> Iterator[str]:
        if not self.grammar:
            yield from self._pieces()
            return
        from vramchat.daemon.llama.grammar_sampling import grammar_last

        with grammar_last(self.model.llm, self.grammar):  # llama.cpp's order: sample, then check
            yield from self._pieces()

    def _pieces(self) -> Iterator[str]:
        llm, sampling = self.model.llm, self.sampling
        text_out = self.text_out
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # generate() yields token ids. Detokenizing each one on its own, through an incremental
        # UTF-8 decoder, keeps the cost per token constant; create_completion(stream=True)
        # re-detokenizes the whole reply at every token, which is quadratic in its length.
        tokens = llm.generate(
            self.prompt.tokens,
            temp=float(sampling["temperature"]),
            top_p=float(sampling["top_p"]),
            top_k=int(sampling["top_k"]),
            min_p=float(sampling["min_p"]),
            repeat_penalty=float(sampling["repeat_penalty"]),
            frequency_penalty=float(sampling.get("frequency_penalty", 0.0)),  # the HTTP API's
            presence_penalty=float(sampling.get("presence_penalty", 0.0)),
        )
        try:
            for token in tokens:
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.generated += 1
                if self.model._is_end_of_generation(token):
                    self.finish_reason = "stop"
                    break
                text, stopped = text_out.feed(utf8.decode(llm._model.detokenize([token])))
                yield text
                if stopped:
                    self.finish_reason = "stop"
                    return  # what was held back is the stop string's start: never shown
                if self._stop_requested:
                    self.finish_reason = "cancelled"
                    break
                if self.generated >= self.max_tokens:
                    break
        finally:
            tokens.close()  # from this thread: stops compute at once
        if tail := text_out.flush() + utf8.decode(b"", final=True):
            yield tail


class StopFilter:
    """Cuts the reply at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        # Text can end in the start of a stop string only if its last character is one of these.
        self._starts = frozenset(ch for stop in self.stops for ch in stop[:-1])
        self.held = ""
        self.reached: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        self.held += text
        for stop in self.stops:
            if (at := self.held.find(stop)) != -1:
                out, self.held, self.reached = self.held[:at], "", stop
                return out, True
        if not self.held or self.held[-1] not in self._starts:  # most tokens: nothing to hold back
            out, self.held = self.held, ""
            return out, False
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if self.held.endswith(stop[:n])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
