"""The engine: a child process of the daemon that holds one `llama_cpp.Llama`.

It is a separate process for two reasons. A native crash (a segfault, a CUDA out-of-memory abort)
kills only the engine, never the daemon. And loading another model, or the same model with other
`n_gpu_layers`, starts a new process, which is the only way to be sure the VRAM is released.

It talks to the daemon over its end of a private Unix socketpair, one msgpack map per message
(daemon/engine_channel.py):

daemon -> engine: {"op": "load", "model_path", "llama": {Llama() arguments}, "cpu_tensors", "flash_attn_auto",
                  "devices", "rpc_servers", "state_cache_bytes"}, {"op": "generate", "request", "conversation",
                  "messages", "sampling", "stop", "overflow": {"policy", "dropped"}, "grammar"?: GBNF of the
                  whole reply, "tools"?: [OpenAI tools], "tool_grammar"?: GBNF of a call (tools.py)},
                  {"op": "cancel", "request"}, {"op": "shutdown"}
daemon -> engine, between tokens too: {"op": "devices"}, answered by {"ev": "devices", "devices": [...]}
engine -> daemon: {"ev": "started", "pid"}, {"ev": "progress", "fraction"}, {"ev": "ready", ...}, {"ev": "load_failed",
                  "error"}, {"ev": "tok", "request", "text", "t": [...]}, {"ev": "done", "request",
                  "finish_reason", "stats"}, {"ev": "failed", "request", "code", "error"},
                  {"ev": "state_cache", "bytes"} (after a reply's state is kept, between requests)

Everything runs on the main thread: a Llama object is not safe across threads. Cancellation is
checked between tokens by polling the channel, so it takes effect within one token. A `tok` frame
carries one token, or several produced within a few milliseconds (`TokenFrames`), with the
`time.time()` of each in `t`.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from vramchat.daemon.engine_channel import ChannelClosed, EngineEnd
from vramchat.daemon.llama import rpc, tools
from vramchat.daemon.llama.chat_model import SAMPLING_DEFAULTS, ChatModel, PromptTooLong
from vramchat.daemon.llama.grammar import GrammarDeadEnd
from vramchat.daemon.llama.state_cache import ConversationStates
from vramchat.shared import scheduling, thinking

# RAM for the KV state of conversations not in the context right now (see ConversationStates).
DEFAULT_STATE_CACHE_BYTES = 512 * 1024 * 1024
# A token waits in the engine for others to share its frame (TokenFrames) only while the next one
# is expected within this of the frame's first: under the TUI's 1/30 s frame, and under the 20 ms
# that docs/benchmarks.md allows the relay.
FRAME_WINDOW_S = 0.015
# After a reply, the engine keeps its conversation's KV state once no request has come for this
# long: a request the daemon had queued arrives sooner, and the state is then kept at the switch.
IDLE_BEFORE_SAVE_MS = 50


class Engine:
    def __init__(self, channel: EngineEnd) -> None:
        self.channel = channel
        self.model: ChatModel | None = None
        self.log_lines: list[str] = []
        self.shutdown_requested = False
        self.states = ConversationStates(0)
        self.conversation: str | None = None  # whose tokens the context holds
        self.context_saved = False  # the context is in `states` as it is now
        self.rpc_devices: dict[str, dict[str, Any]] = {}  # RPC device name -> as registered at load
        self._last_progress = -1.0

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(message)

    # --- loading -----------------------------------------------------------------------------

    def load(self, params: dict[str, Any]) -> bool:
        """Load the model, reporting progress; True when ready."""
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.states = ConversationStates(int(params.get("state_cache_bytes", DEFAULT_STATE_CACHE_BYTES)))
        self._capture_llama_log(llama_cpp)
        started = time.monotonic()
        # Devices on other machines (`vramchat rpc-server`) join ggml's registry before the
        # Llama is made, and llama.cpp offloads to them as to a local GPU.
        rpc_devices: list[dict[str, Any]] = []
        try:
            for endpoint in params.get("rpc_servers") or []:
                rpc_devices += [device.to_dict() for device in rpc.register_server(endpoint)]
            self.rpc_devices = {device["name"]: device for device in rpc_devices}
            offload = [d.name for d in rpc.local_devices() if d.type in ("GPU", "IGPU")]
        except rpc.RpcError as exc:
            self.send({"ev": "load_failed", "error": f"{exc}; start `vramchat rpc-server` there, or load without it"})
            return False
        if (planned := params.get("devices")) is not None and planned != offload[: len(planned)]:
            # The plan's tensor_split counts layers per device in this order: another order misplaces them.
            self.send(
                {
                    "ev": "load_failed",
                    "error": f"the plan expected the offload devices {planned}, and llama.cpp has {offload}; load again",
                }
            )
            return False
        try:
            self.model = model = ChatModel.load(
                params["model_path"],
                **params["llama"],
                cpu_tensors=params.get("cpu_tensors", []),
                flash_attn_auto=params.get("flash_attn_auto", False),
                on_progress=self._report_progress,
            )
        except Exception as exc:  # llama-cpp-python raises ValueError for most load failures
            self.send({"ev": "load_failed", "error": load_error_text(exc, self.log_lines)})
            return False
        self.send(
            {
                "ev": "ready",
                "load_seconds": time.monotonic() - started,
                "n_ctx": model.n_ctx,
                "n_vocab": model.llm.n_vocab(),
                "chat_template": model.chat_template,
                "load_log": "".join(self.log_lines),
                "rpc_devices": rpc_devices,
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

    def _report_progress(self, fraction: float) -> None:
        """llama.cpp's load progress, every 2% (it calls back for every tensor)."""
        if fraction - self._last_progress >= 0.02 or fraction >= 1.0:
            self._last_progress = fraction
            self.send({"ev": "progress", "fraction": float(fraction)})

    # --- generation --------------------------------------------------------------------------

    def generate(self, request: dict[str, Any]) -> None:
        """One reply. Whatever fails ends this request with `failed`, never the engine: the model
        stays loaded for the requests after it."""
        try:
            self._generate(request)
        except (ChannelClosed, OSError):
            raise  # the daemon is gone: nobody to answer
        except Exception as exc:
            error = f"the engine failed on this request ({type(exc).__name__}: {exc})"
            self.send({"ev": "failed", "request": request.get("request"), "code": "internal", "error": error})

    def _generate(self, request: dict[str, Any]) -> None:
        request_id = request["request"]
        model = self.model
        assert model is not None, "generate before a successful load"
        sampling = {**SAMPLING_DEFAULTS, **(request.get("sampling") or {})}
        overflow = request.get("overflow") or {}
        try:
            messages, rendered_tools = tools.template_messages(model, request["messages"], request.get("tools"))
            prompt = model.fitted_prompt(
                messages,
                overflow=overflow.get("policy", "error"),
                dropped=int(overflow.get("dropped", 0)),
                reply_room=min(int(sampling["max_tokens"]), model.n_ctx // 4),
                tools=rendered_tools,
            )
        except PromptTooLong as exc:
            self.send({"ev": "failed", "request": request_id, "code": "prompt_too_long", "error": str(exc)})
            return
        except Exception as exc:
            self.send(
                {"ev": "failed", "request": request_id, "code": "bad_request", "error": f"cannot format the conversation: {exc}"}
            )
            return
        prompt.stops.extend(request.get("stop") or [])  # the request's own, as OpenAI's `stop`
        try:
            reply = tools.reply_for(model, prompt, sampling, request)
        except tools.InvalidGrammar as exc:
            self.send({"ev": "failed", "request": request_id, "code": "invalid_value", "error": str(exc)})
            return
        llm = model.llm
        conversation = request.get("conversation")
        if conversation != self.conversation:
            if self.conversation is not None and not self.context_saved:
                self.states.save(self.conversation, llm, self.llama_cpp)
            self.conversation = conversation
        cached = self.states.restore(conversation, llm, self.llama_cpp, prompt.tokens)
        self.context_saved = False
        seed = reply.sampling["seed"]
        llm.set_seed(seed if seed is not None else random.randrange(2**31))

        # A reply under a grammar is JSON or a tool call from its first token: no reasoning opening.
        opens_thinking = prompt.opens_thinking and not request.get("grammar")
        frames = TokenFrames(self.send, request_id, opening=thinking.OPEN + "\n" if opens_thinking else "")
        started = time.monotonic()
        cancel_seen_at: int | None = None  # tokens generated when the engine saw the cancel
        try:
            for text in reply:
                frames.add(text)
                if cancel_seen_at is None and self._cancel_requested(request_id):
                    cancel_seen_at = reply.generated
                    reply.stop()
        except Exception as exc:
            frames.flush()
            code = "invalid_value" if isinstance(exc, GrammarDeadEnd) else "internal"  # the schema, for this model
            self.send({"ev": "failed", "request": request_id, "code": code, "error": f"generation failed: {exc}"})
            return
        ended = time.monotonic()
        frames.flush()

        n_prompt = len(prompt.tokens)
        evaluated = n_prompt - min(cached, n_prompt - 1)
        first_token_at, generated = reply.first_token_at, reply.generated
        ttft = (first_token_at - started) if first_token_at else None
        decode_time = ended - first_token_at if first_token_at else 0.0
        self.send(
            {
                "ev": "done",
                "request": request_id,
                "finish_reason": reply.finish_reason,
                "stats": {
                    "prompt_tokens": n_prompt,
                    "prompt_cached_tokens": n_prompt - evaluated,
                    "generated_tokens": generated,
                    "ttft_s": ttft,
                    "prompt_tokens_per_s": evaluated / ttft if ttft else None,
                    "tokens_per_s": (generated - 1) / decode_time if generated > 1 and decode_time > 0 else None,
                    "total_s": ended - started,
                    "state_cache_bytes": self.states.used_bytes,
                    "state_cache_entries": len(self.states.entries),
                    "dropped_messages": prompt.dropped,
                    # The engine's cancel point: tokens it generated after it saw the cancel.
                    "tokens_after_cancel": None if cancel_seen_at is None else generated - cancel_seen_at,
                },
            }
        )

    def _cancel_requested(self, request_id: str) -> bool:
        while self.channel.poll(0):
            message = self.channel.recv()
            if message.get("op") == "shutdown":
                self.shutdown_requested = True
                return True
            if message.get("op") == "cancel" and message.get("request") == request_id:
                return True
            if message.get("op") == "devices":
                self.send_devices()
        return False

    def send_devices(self) -> None:
        """The memory of every device ggml sees, RPC devices included (a round trip to each server)."""
        try:
            devices = []
            for device in rpc.local_devices():  # fresh memory figures; where each lives, from the load
                registered = self.rpc_devices.get(device.name, {})
                device.endpoint, device.buffer_name = registered.get("endpoint"), registered.get("buffer_name")
                devices.append(device.to_dict())
        except rpc.RpcError:  # a build without the RPC backend: NVML covers the local GPUs
            devices = []
        self.send({"ev": "devices", "devices": devices})

    def save_while_idle(self) -> None:
        """Keep the conversation's KV state while the user reads its reply, not when a request for
        another conversation comes: copying it takes tens of milliseconds for a long conversation
        (34 ms for 46 MB on a 2-core VM), which would delay that request's first token."""
        if self.model is None or self.conversation is None or self.context_saved or not self.states.budget_bytes:
            return
        if self.channel.poll(IDLE_BEFORE_SAVE_MS):
            return  # a request is here: it goes first
        self.states.save(self.conversation, self.model.llm, self.llama_cpp)
        self.context_saved = True
        self.send({"ev": "state_cache", "bytes": self.states.used_bytes})

    def serve(self) -> None:
        while not self.shutdown_requested:
            self.save_while_idle()
            message = self.channel.recv()
            op = message.get("op")
            if op == "generate":
                self.generate(message)
            elif op == "devices":
                self.send_devices()
            elif op == "shutdown":
                break
            # A cancel for a request that already finished needs no answer.


class TokenFrames:
    """Coalesces a reply's tokens into `tok` frames for the daemon.

    Every frame wakes the daemon's loop, then its ZeroMQ I/O thread, then each client's: threads
    that preempt a llama thread on a machine with no core to spare, which the other llama threads
    then wait for. So a token joins the next frame when the one after it is expected (at the last
    interval between tokens) before the frame's oldest token has waited `window_s`; otherwise the
    frame goes at once. The first token of a reply, and every token of a model slower than one
    per `window_s`, go at once; a fast model costs one frame per `window_s`.
    """

    def __init__(
        self, send: Callable[[dict[str, Any]], None], request_id: str, window_s: float = FRAME_WINDOW_S, opening: str = ""
    ) -> None:
        """`opening` is text the reply starts with that the model did not generate (the reasoning
        block a template opened): it goes first in the first frame, and is no token."""
        self.send, self.request_id, self.window_s = send, request_id, window_s
        self.opening = opening
        self.texts: list[str] = []
        self.stamps: list[float] = []  # time.time() of each token in `texts`
        self.last_at = -math.inf  # of the previous token

    def add(self, text: str, now: float | None = None) -> None:
        """One token's text: "" for a token that shows nothing yet, which may still end the frame."""
        now = time.time() if now is None else now
        interval, self.last_at = now - self.last_at, now
        if text:
            self.texts.append(text)
            self.stamps.append(now)
        if self.stamps and now + interval - self.stamps[0] > self.window_s:
            self.flush()

    def flush(self) -> None:
        if self.texts:
            text, self.opening = self.opening + "".join(self.texts), ""
            self.send({"ev": "tok", "request": self.request_id, "text": text, "t": self.stamps})
            self.texts, self.stamps = [], []


def load_error_text(exc: Exception, log_lines: list[str]) -> str:
    """llama-cpp-python's exception says little ("Failed to load model from file"); the reason
    is in llama.cpp's log, so quote its last error lines."""
    reasons = [line.strip() for line in log_lines if "error" in line.lower() or "failed" in line.lower()]
    detail = "; ".join(reasons[-3:])
    return f"{exc}" + (f" (llama.cpp: {detail})" if detail else "")


def die_with_parent() -> None:
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
    die_with_parent()
    scheduling.use_default_slice()  # the daemon's short one is inherited; llama threads start from this one
    parser = argparse.ArgumentParser(description="vramchat engine (started by vramchatd)")
    parser.add_argument("--fd", type=int, required=True, help="this engine's end of the daemon's socketpair")
    args = parser.parse_args(argv)
    channel = EngineEnd(socket.socket(fileno=args.fd))
    engine = Engine(channel)
    code = 0
    try:
        engine.send({"ev": "started", "pid": os.getpid()})  # the daemon sends nothing before this
        load = channel.recv()
        if load.get("op") == "load" and engine.load(load):
            engine.serve()
        else:
            code = 1
    except ChannelClosed:
        code = 1  # the daemon went away without a shutdown
    channel.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
