"""A reply's reasoning block: split from the answer, counted by the daemon, folded in the TUI, stored whole."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_tui_app import FIXED_SNAPSHOT, QUESTION, reply, shows, text_of, until
from textual.widgets._collapsible import CollapsibleTitle
from tui_stub import StubClient

from vramchat.daemon.llama.chat_model import ChatModel
from vramchat.shared import thinking
from vramchat.shared.client import Client
from vramchat.shared.thinking import ThinkingClock, split
from vramchat.tui.app import VramchatApp
from vramchat.tui.thinking_view import ThinkingFold
from vramchat.tui.widgets import ChatMessage

from gguf_factory import TinyModelSpec, write_tiny_llama
from helpers import wait_ready

# DeepSeek-R1's template in small: it opens the reasoning block at the end of the generation
# prompt, and strips an earlier reply's block from the history.
R1_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|assistant|>' + content + '<|end|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|><think>\\n' }}{% endif %}"
)


def test_split_finds_the_block_only_at_the_start_and_holds_back_a_partial_tag() -> None:
    assert split("<think>\nweighing it</think>\n\nParis.") == thinking.Parts("weighing it", "Paris.", True)
    assert split("<think>\nstill weigh") == thinking.Parts("still weigh", "", False)
    assert split("<think>\nalmost</thi") == thinking.Parts("almost", "", False)
    assert split("<thi") == thinking.Parts("", "", False)
    assert split("Paris. </think> is a tag") == thinking.Parts(None, "Paris. </think> is a tag", True)
    assert split("") == thinking.Parts(None, "", True)


def test_the_clock_counts_tokens_and_seconds_up_to_the_frame_that_closes_the_block() -> None:
    clock = ThinkingClock()
    clock.add("<think>\nHm", [10.0])
    clock.add("m, so", [10.1, 10.2])
    assert clock.stats is None
    clock.add("</thi", [10.3])
    clock.add("nk>Yes", [10.4, 10.5])
    clock.add(" more </think>", [10.6])  # the answer's own text: the block ended before
    assert clock.stats == {"tokens": 6, "seconds": 0.5}
    plain = ThinkingClock()
    plain.add("Yes </think>", [1.0, 2.0])
    assert plain.stats is None


THINK_PIECES = [
    "<think>\n",
    "The user asks ",
    "for a capital.\n\n",
    "France: Paris.",
    "</think>\n\n",
    "The capital is **Paris**.",
]
WHOLE = "".join(THINK_PIECES)


async def test_a_reply_thinks_live_then_folds_into_one_line_that_expands_and_keeps_the_text_whole() -> None:
    client = StubClient(FIXED_SNAPSHOT, {"c1": [QUESTION]})
    app = VramchatApp(client)
    async with app.run_test(size=(80, 40)) as pilot:
        await until(pilot, lambda: app.connected and len(app.query(ChatMessage)) == 1)
        client.publish("msg", reply("generating", ""))
        await until(pilot, lambda: app.chat.message_widget("m2") is not None)
        widget = app.chat.message_widget("m2")
        assert widget is not None
        text = ""
        for index, piece in enumerate(THINK_PIECES[:4]):
            text += piece
            client.publish(
                "tok",
                {
                    "message": "m2",
                    "conversation": "c1",
                    "request": "r",
                    "text": piece,
                    "count": 2,
                    "t_tokens": [index, index + 0.5],
                },
            )
            await until(pilot, shows(widget, text))
        fold = widget.query_one(ThinkingFold)
        assert fold.has_class("thinking") and not fold.collapsed and fold.title == "thinking… 8 tokens"
        assert fold.markdown.source == "The user asks for a capital.\n\nFrance: Paris." and widget.body.source == ""
        ending = "".join(THINK_PIECES[4:])
        client.publish(
            "tok", {"message": "m2", "conversation": "c1", "request": "r", "text": ending, "count": 2, "t_tokens": [4.0, 4.5]}
        )
        await until(pilot, lambda: widget.shown == WHOLE)
        assert fold.collapsed and fold.title == "thought for 10 tokens, 4.5 s"  # the app's own count
        assert widget.body.source == "The capital is **Paris**."
        done = {
            **reply("complete", WHOLE),
            "stats": {"generated_tokens": 12, "tokens_per_s": 3.0, "thinking": {"tokens": 9, "seconds": 4.2}},
        }
        client.publish("msg", done)
        await until(pilot, lambda: fold.title == "thought for 9 tokens, 4.2 s")  # the daemon's
        assert fold.collapsed and widget.shown == WHOLE and widget.message["content"] == WHOLE
        title = fold.query_one(CollapsibleTitle)
        title.focus()  # the fold's title takes the focus (Tab) and a click; Enter expands it
        await pilot.press("enter")
        await until(pilot, lambda: not fold.collapsed)
        assert fold.markdown.source == "The user asks for a capital.\n\nFrance: Paris."
        await pilot.press("enter")
        await until(pilot, lambda: fold.collapsed)
        assert "12 tokens" in text_of(widget.meta)


async def test_a_stored_reply_with_a_block_is_drawn_folded() -> None:
    stored = {**reply("complete", WHOLE), "stats": {"generated_tokens": 12, "thinking": {"tokens": 9, "seconds": 4.2}}}
    question = {**QUESTION, "content": "<think>\nwhy</think> is this tag shown?"}  # a question has no block
    app = VramchatApp(StubClient(FIXED_SNAPSHOT, {"c1": [question, stored]}))
    async with app.run_test(size=(80, 30)) as pilot:
        await until(pilot, lambda: len(app.query(ChatMessage)) == 2)
        assert app.chat.message_widget("m1").body.source == question["content"]  # type: ignore[union-attr]
        fold = app.query_one(ThinkingFold)
        assert fold.collapsed and fold.title == "thought for 9 tokens, 4.2 s"
        assert app.chat.message_widget("m2").body.source == "The capital is **Paris**."  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def r1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("r1") / "tiny-r1.gguf", TinyModelSpec(chat_template=R1_TEMPLATE))


def test_the_template_opens_the_block_and_strips_an_earlier_replys_from_the_next_prompt(r1_model: Path) -> None:
    model = ChatModel.load(str(r1_model), n_gpu_layers=0, n_ctx=512, n_threads=1)
    first = model.prompt([{"role": "user", "content": "Capital of France?"}])
    assert first.opens_thinking
    history = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "<think>\nsecret reasoning</think>\n\nParis."},  # passed whole, as stored
        {"role": "user", "content": "And of Spain?"},
    ]
    # The tiny vocabulary's byte tokens detokenize to their names ("<0x50>"): read the bytes back.
    names = model.llm.detokenize(model.prompt(history).tokens, special=True).decode()
    text = bytes(int(code, 16) for code in re.findall(r"<0x([0-9A-F]{2})>", names)).decode()
    assert "Paris." in text and "secret reasoning" not in text


async def test_the_engine_stores_the_block_the_template_opened_as_the_replys_first_text(
    daemon_factory: Any, r1_model: Path
) -> None:
    daemon = daemon_factory("--model", str(r1_model))
    async with Client(daemon.runtime_dir, timeout=60) as client:
        await wait_ready(client)
        await client.subscribe()
        conversation = (await client.request("conversation.create", {}))["conversation"]["id"]
        request_id = uuid.uuid4().hex
        sampling = {"temperature": 0.0, "max_tokens": 12, "seed": 1}
        await client.request("chat", {"content": "Hi", "conversation": conversation, "sampling": sampling}, request_id=request_id)
        counted = 0
        async for event in client.raw_events():
            if event.topic == "tok" and event.body["request"] == request_id:
                counted += event.body["count"]
            if event.topic == "msg" and event.body.get("request") == request_id and event.body["status"] != "generating":
                final = event.body
                break
        stored = (await client.request("conversation.get", {"id": conversation}))["messages"][-1]
    assert stored["content"].startswith("<think>\n") and stored["content"] == final["content"]
    assert final["stats"]["generated_tokens"] == counted == 12  # the opening is no token
