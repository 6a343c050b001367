"""Tool calls in the engine: the tools and earlier calls in the prompt, and a reply that may call.

A template that renders `tools` itself (Qwen 2.5, Hermes, Llama 3.1...: its source names them, as
llama.cpp's minja decides it) gets them, and earlier calls with their arguments as objects, as
Hugging Face's templates expect. Any other template gets the tools described in a system message,
earlier calls as the <tool_call> text that describes, and tool results as user messages, so it
never meets a role it does not know.

A call is written in the Hermes form (grammar.TOOL_OPEN ... TOOL_CLOSE). For tool_choice `auto`
the model writes freely until it opens a call; from there a grammar holds it to one call of one
of the tools with valid arguments (AutoToolReply), as llama.cpp's lazy grammars do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from vramchat.daemon.llama.chat_model import ChatModel, Prompt, Reply
from vramchat.daemon.llama.grammar import TOOL_CLOSE, TOOL_OPEN

DESCRIBE_TOOLS = (
    "You can call functions to help with the user's request. The functions are described in JSON "
    "inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call one, reply with exactly this and nothing else:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n</tool_call>\n'
    "If no function is needed, answer in plain text."
)


def template_messages(
    model: ChatModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to give `model`'s chat template."""
    if model.template_knows_tools:
        return [_with_object_arguments(m) for m in messages], tools or None
    plain = [_as_text(m) for m in messages]
    if tools:
        description = DESCRIBE_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{description}"}
        else:
            plain.insert(0, {"role": "system", "content": description})
    return plain, None


def _with_object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return {**message, "content": message.get("content") or ""}
    parsed = [{**call, "function": {**call["function"], "arguments": _loads(call["function"]["arguments"])}} for call in calls]
    return {**message, "content": message.get("content") or "", "tool_calls": parsed}


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _as_text(message: dict[str, Any]) -> dict[str, str]:
    """One message as plain role and text, for a template that knows nothing of tools."""
    content = message.get("content") or ""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = "".join(
        f"{TOOL_OPEN}\n"
        + json.dumps({"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}, ensure_ascii=False)
        + f"\n{TOOL_CLOSE}"
        for c in message.get("tool_calls") or []
    )
    return {"role": message["role"], "content": content + ("\n" if content and calls else "") + calls}


class AutoToolReply:
    """A reply that writes freely until it opens a tool call, then finishes that call under the
    call grammar: a continuation of the same tokens, so the KV cache carries over."""

    def __init__(self, model: ChatModel, prompt: Prompt, sampling: dict[str, Any], call_grammar: str) -> None:
        self.model, self.prompt, self.call_grammar = model, prompt, call_grammar
        self.free = model.reply(Prompt(prompt.tokens, [*prompt.stops, TOOL_OPEN], prompt.dropped), sampling)
        self.sampling = self.free.sampling
        self.current: Reply = self.free
        self.bound: Reply | None = None

    @property
    def generated(self) -> int:
        return self.free.generated + (self.bound.generated if self.bound else 0)

    @property
    def first_token_at(self) -> float | None:
        return self.free.first_token_at

    @property
    def finish_reason(self) -> str:
        return self.current.finish_reason

    def stop(self) -> None:
        self.current.stop()

    def __iter__(self) -> Iterator[str]:
        written = []
        for text in self.free:
            written.append(text)
            yield text
        if self.free.text_out.reached != TOOL_OPEN or self.free.finish_reason == "cancelled":
            return
        yield TOOL_OPEN
        llm = self.model.llm
        opened = llm.tokenize(("".join(written) + TOOL_OPEN).encode("utf-8"), add_bos=False, special=True)
        room = int(self.sampling["max_tokens"]) - self.free.generated
        if room <= 0:
            self.free.finish_reason = "length"
            return
        self.current = self.bound = self.model.reply(
            Prompt(self.prompt.tokens + opened, [], self.prompt.dropped),
            {**self.sampling, "max_tokens": room},
            self.call_grammar,
        )
        yield from self.bound


class InvalidGrammar(ValueError):
    pass


def check_grammar(model: ChatModel, grammar: str) -> None:
    """Parse `grammar` as llama.cpp will: a grammar it cannot parse would crash the sampler chain
    (a segfault in llama-cpp-python 0.3), so it ends the request here instead (InvalidGrammar)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(model.llm._model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidGrammar("llama.cpp cannot parse the grammar built for this request; see the engine's log")
    llama_cpp.llama_sampler_free(sampler)


def reply_for(model: ChatModel, prompt: Prompt, sampling: dict[str, Any], request: dict[str, Any]) -> Reply | AutoToolReply:
    """The reply a `generate` request asks for: under its grammar (a schema, or a required call),
    able to call a tool (auto), or free. InvalidGrammar if llama.cpp cannot parse its grammar."""
    for text in (request.get("grammar"), request.get("tool_grammar")):
        if text:
            check_grammar(model, text)
    if grammar := request.get("grammar"):
        prompt.stops = []  # the grammar ends the reply; a stop string could only cut it short
        return model.reply(prompt, sampling, grammar)
    if call_grammar := request.get("tool_grammar"):
        return AutoToolReply(model, prompt, sampling, call_grammar)
    return model.reply(prompt, sampling)
