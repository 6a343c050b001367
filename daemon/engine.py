"""The engine: a child process of the daemon that holds one `llama_cpp.Llama`.

It is a separate process for two reasons. A native crash (a segfault, a CUDA out-of-memory abort)
kills only the engine, never the daemon. And loading another model, or the same model with other
`n_gpu_layers`, starts a new process, which is the only way to be sure the VRAM is released.

It talks to the daemon over a private ZeroMQ PAIR socket, one msgpack map per frame:

daemon -> engine: {"op": "load", ...Llama params}, {"op": "generate", "request", "messages",
                  "sampling"}, {"op": "cancel", "request"}, {"op": "shutdown"}
engine -> daemon: {"ev": "started", "pid"}, {"ev": "progress", "fraction"}, {"ev": "ready", ...}, {"ev": "load_failed",
                  "error"}, {"ev": "tok", "request", "text"}, {"ev": "done", "request",
                  "finish_reason", "stats"}, {"ev": "failed", "request", "code", "error"}

Everything runs on the main thread: a Llama object is not safe across threads. Cancellation is
checked between tokens by polling the socket, so it takes effect within one token.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import ctypes
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import zmq

# Plain ChatML, for models whose GGUF carries no chat template (the tiny test models, some
# base models). llama-cpp-python would fall back to the llama-2 format instead.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_STOP = ["<|im_end|>"]

# RAM for the KV state of conversations not in the context right now (see ConversationStates).
DEFAULT_STATE_CACHE_BYTES = 512 * 1024 * 1024

SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "max_tokens": 1024,
    "seed": None,
}


class Engine:
    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.llm: Any = None
        self.formatter: Any = None
        self.fallback_stop: list[str] | None = None
        self.is_end_of_generation: Callable[[int], bool] = lambda token: False
        self.n_ctx = 0
        self.log_lines: list[str] = []
        self.shutdown_requested = False
        self.states = ConversationStates(0)
        self.conversation: str | None = None  # whose tokens the context holds

    def send(self, message: dict[str, Any]) -> None:
        self.socket.send(msgpack.packb(message, use_bin_type=True))

    # --- loading -----------------------------------------------------------------------------

    def load(self, params: dict[str, Any]) -> bool:
        """Load the model, reporting progress; True when ready."""
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llama_cpp = llama_cpp
        self.states = ConversationStates(int(params.get("state_cache_bytes", DEFAULT_STATE_CACHE_BYTES)))
        self._capture_llama_log(llama_cpp)
        self._report_load_progress(llama_cpp)
        started = time.monotonic()
        try:
            self.llm = Llama(
                model_path=params["model_path"],
                n_gpu_layers=params["n_gpu_layers"],
                n_ctx=params["n_ctx"],
                n_threads=params.get("n_threads"),
                n_threads_batch=params.get("n_threads"),
                n_batch=params.get("n_batch", 512),
                n_ubatch=params.get("n_ubatch", 512),
                use_mmap=True,
                verbose=False,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError for most load failures
            self.send({"ev": "load_failed", "error": _load_error_text(exc, self.log_lines)})
            return False

        llm = self.llm
        template = llm.metadata.get("tokenizer.chat_template")
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template or FALLBACK_CHAT_TEMPLATE,
            eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        self.fallback_stop = None if template else FALLBACK_STOP
        self.n_ctx = llm.n_ctx()
        vocab = llm._model.vocab
        self.is_end_of_generation = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        self.send(
            {
                "ev": "ready",
                "load_seconds": time.monotonic() - started,
                "n_ctx": self.n_ctx,
                "n_vocab": llm.n_vocab(),
                "chat_template": "gguf" if template else "chatml (fallback: the GGUF has none)",
                "load_log": "".join(self.log_lines),
            }
        )
        return True

    def _capture_llama_log(self, llama_cpp: Any) -> None:
        """Keep llama.cpp's log (it carries the buffer sizes); pass warnings and errors to stderr."""

        # ggml_log_level: DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 continues the previous line.
        # (llama-cpp-python's _logger.py documents an older numbering.)
        last_level = [0]

        @llama_cpp.llama_log_callback
        def on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", errors="replace")
            self.log_lines.append(line)
            if level != 5:
                last_level[0] = level
            if last_level[0] in (3, 4):
                sys.stderr.write(line)

        self._log_callback = on_log  # ctypes callbacks must outlive their registration
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))

    def _report_load_progress(self, llama_cpp: Any) -> None:
        """Llama() builds its model params from llama_model_default_params(); hook a progress
        callback into them, since Llama() has no parameter for it."""
        last_sent = [-1.0]

        @llama_cpp.llama_progress_callback
        def on_progress(fraction: float, _user_data: ctypes.c_void_p) -> bool:
            if fraction - last_sent[0] >= 0.02 or fraction >= 1.0:
                last_sent[0] = fraction
                self.send({"ev": "progress", "fraction": float(fraction)})
            return True

        self._progress_callback = on_progress
        default_params = llama_cpp.llama_model_default_params

        def params_with_progress() -> Any:
            params = default_params()
            params.progress_callback = on_progress
            return params

        llama_cpp.llama_model_default_params = params_with_progress

    # --- generation --------------------------------------------------------------------------

    def generate(self, request: dict[str, Any]) -> None:
        request_id = request["request"]
        sampling = {**SAMPLING_DEFAULTS, **(request.get("sampling") or {})}
        llm = self.llm
        try:
            formatted = self.formatter(messages=request["messages"])
            prompt = llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)
        except Exception as exc:
            self.send({"ev": "failed", "request": request_id, "code": "bad_request", "error": f"cannot format the conversation: {exc}"})
            return
        if len(prompt) >= self.n_ctx:
            self.send(
                {
                    "ev": "failed",
                    "request": request_id,
                    "code": "prompt_too_long",
                    "error": f"the conversation is {len(prompt)} tokens and the context window is {self.n_ctx}. "
                    "Start a new conversation, shorten the message, or load the model with a larger context (--ctx).",
                }
            )
            return
        stops = formatted.stop if isinstance(formatted.stop, list) else ([formatted.stop] if formatted.stop else [])
        text_out = _StopFilter(stops + (self.fallback_stop or []))
        max_tokens = min(int(sampling["max_tokens"]), self.n_ctx - len(prompt))
        conversation = request.get("conversation")
        if conversation != self.conversation:
            if self.conversation is not None:
                self.states.save(self.conversation, llm, self.llama_cpp)
            self.conversation = conversation
        cached = self.states.restore(conversation, llm, self.llama_cpp, prompt)
        llm.set_seed(sampling["seed"] if sampling["seed"] is not None else random.randrange(2**31))
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

        started = time.monotonic()
        first_token_at: float | None = None
        generated = 0
        finish_reason = "length"
        # generate() yields token ids. Detokenizing each one on its own, through an incremental
        # UTF-8 decoder, keeps the cost per token constant; create_completion(stream=True)
        # re-detokenizes the whole reply at every token, which is quadratic in its length.
        tokens = llm.generate(
            prompt,
            temp=float(sampling["temperature"]),
            top_p=float(sampling["top_p"]),
            top_k=int(sampling["top_k"]),
            min_p=float(sampling["min_p"]),
            repeat_penalty=float(sampling["repeat_penalty"]),
        )
        try:
            for token in tokens:
                if first_token_at is None:
                    first_token_at = time.monotonic()
                generated += 1
                if self.is_end_of_generation(token):
                    finish_reason = "stop"
                    break
                text, stopped = text_out.feed(utf8.decode(llm._model.detokenize([token])))
                if text:
                    self.send({"ev": "tok", "request": request_id, "text": text, "t": time.time()})
                if stopped:
                    finish_reason = "stop_string"
                    break
                if self._cancel_requested(request_id):
                    finish_reason = "cancelled"
                    break
                if generated >= max_tokens:
                    break
        except Exception as exc:
            self.send({"ev": "failed", "request": request_id, "code": "internal", "error": f"generation failed: {exc}"})
            return
        finally:
            tokens.close()  # from this thread: stops compute at once
        if finish_reason != "stop_string" and (tail := text_out.flush() + utf8.decode(b"", final=True)):
            self.send({"ev": "tok", "request": request_id, "text": tail})
        ended = time.monotonic()
        finish_reason = "stop" if finish_reason == "stop_string" else finish_reason

        evaluated = len(prompt) - min(cached, len(prompt) - 1)
        ttft = (first_token_at - started) if first_token_at else None
        decode_time = ended - first_token_at if first_token_at else 0.0
        self.send(
            {
                "ev": "done",
                "request": request_id,
                "finish_reason": finish_reason,
                "stats": {
                    "prompt_tokens": len(prompt),
                    "prompt_cached_tokens": len(prompt) - evaluated,
                    "generated_tokens": generated,
                    "ttft_s": ttft,
                    "prompt_tokens_per_s": evaluated / ttft if ttft else None,
                    "tokens_per_s": (generated - 1) / decode_time if generated > 1 and decode_time > 0 else None,
                    "total_s": ended - started,
                    "state_cache_bytes": self.states.used_bytes,
                    "state_cache_entries": len(self.states.entries),
                },
            }
        )

    def _cancel_requested(self, request_id: str) -> bool:
        while self.socket.poll(0):
            message = msgpack.unpackb(self.socket.recv(), raw=False)
            if message.get("op") == "shutdown":
                self.shutdown_requested = True
                return True
            if message.get("op") == "cancel" and message.get("request") == request_id:
                return True
        return False

    def serve(self) -> None:
        while not self.shutdown_requested:
            message = msgpack.unpackb(self.socket.recv(), raw=False)
            op = message.get("op")
            if op == "generate":
                self.generate(message)
            elif op == "shutdown":
                break
            # A cancel for a request that already finished needs no answer.


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
        if entry is None or _common_prefix(prompt, entry.tokens) <= current:
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


class _StopFilter:
    """Cuts the reply at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        self.held += text
        for stop in self.stops:
            if (at := self.held.find(stop)) != -1:
                out, self.held = self.held[:at], ""
                return out, True
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if self.held.endswith(stop[:n])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _load_error_text(exc: Exception, log_lines: list[str]) -> str:
    """llama-cpp-python's exception says little ("Failed to load model from file"); the reason
    is in llama.cpp's log, so quote its last error lines."""
    reasons = [line.strip() for line in log_lines if "error" in line.lower() or "failed" in line.lower()]
    detail = "; ".join(reasons[-3:])
    return f"{exc}" + (f" (llama.cpp: {detail})" if detail else "")


def _die_with_parent() -> None:
    """If the daemon is killed with -9, take the engine (and the VRAM it holds) down with it.
    Ctrl-C in the daemon's terminal is the daemon's to handle, not the engine's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the daemon's shutdown still stops the engine
    if os.getppid() == 1:
        sys.exit(1)  # the daemon died before prctl took effect


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    parser = argparse.ArgumentParser(description="vramchat engine (started by vramchatd)")
    parser.add_argument("--endpoint", required=True, help="the daemon's private PAIR endpoint")
    args = parser.parse_args(argv)
    context = zmq.Context()
    socket = context.socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 2000)
    socket.connect(args.endpoint)
    engine = Engine(socket)
    engine.send({"ev": "started", "pid": os.getpid()})  # the daemon sends nothing before this
    load = msgpack.unpackb(socket.recv(), raw=False)
    code = 0
    if load.get("op") == "load" and engine.load(load):
        engine.serve()
    else:
        code = 1
    socket.close()
    context.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
