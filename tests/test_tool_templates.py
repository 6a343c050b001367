"""How tools and earlier calls reach a model's chat template (daemon/llama/tools.py), with real
llama-cpp-python templates loaded from tiny GGUFs: one that renders tools, one that does not."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vramchat.daemon.llama.chat_model import ChatModel
from vramchat.daemon.llama.tools import template_messages

from gguf_factory import TinyModelSpec, write_tiny_llama

# Qwen 2.5's way, cut to its bones: tools in the system turn, calls with object arguments.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    '<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}<|im_start|>assistant\n"
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
]
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
]


@pytest.fixture(scope="module")
def models() -> Iterator[dict[str, ChatModel]]:
    directory = Path(tempfile.mkdtemp(prefix="vc-templates-"))
    specs = {"tools": TinyModelSpec(chat_template=TOOLS_TEMPLATE), "plain": TinyModelSpec()}
    loaded = {
        name: ChatModel.load(str(write_tiny_llama(directory / f"{name}.gguf", spec)), n_gpu_layers=0, n_ctx=512, n_threads=1)
        for name, spec in specs.items()
    }
    yield loaded
    for model in loaded.values():
        model.llm.close()
    shutil.rmtree(directory, ignore_errors=True)


def rendered(model: ChatModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    shaped, for_template = template_messages(model, messages, tools)
    return str(model.formatter(messages=shaped, tools=for_template).prompt)  # type: ignore[arg-type]


def test_a_template_that_knows_tools_renders_them_and_earlier_calls_with_object_arguments(models: dict[str, ChatModel]) -> None:
    model = models["tools"]
    assert model.template_knows_tools
    prompt = rendered(model, HISTORY, TOOLS)
    assert json.dumps(TOOLS[0]) in prompt
    assert '"arguments": {"city": "Paris"}' in prompt  # an object, as Hugging Face's templates expect
    assert '<tool_response>\n{"sky": "clear"}\n</tool_response>' in prompt


def test_a_template_without_tools_gets_them_described_and_results_as_user_text(models: dict[str, ChatModel]) -> None:
    model = models["plain"]
    assert not model.template_knows_tools
    prompt = rendered(model, HISTORY, TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou can call functions")
    assert json.dumps(TOOLS[0]) in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<|im_start|>user\n<tool_response>\n{"sky": "clear"}\n</tool_response>' in prompt
    assert "<|im_start|>tool" not in prompt
