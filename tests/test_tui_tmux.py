"""The real `vramchat` in a real terminal (tmux): ask the demo model a question, read the answer
off the screen, open the dashboard, quit; copy a reply and its code through OSC 52 into tmux's
clipboard."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vramchat.daemon.store import Store
from vramchat.shared.client import Client

from helpers import DaemonProcess

VRAMCHAT = Path(sys.executable).parent / "vramchat"


@pytest.fixture(autouse=True)
def tmux_installed() -> None:
    """`make test` installs tmux (scripts/install-test-tools.sh); without it this test fails, not skips."""
    assert shutil.which("tmux"), "tmux is not installed: run scripts/install-test-tools.sh (or apt-get install -y tmux)"


def tmux(session: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A tmux server of the session's own (-L): one the developer runs would hand the pane its
    environment instead of the test's."""
    return subprocess.run(["tmux", "-L", session, *args], capture_output=True, text=True, check=check)


def screen(session: str) -> str:
    return tmux(session, "capture-pane", "-p", "-t", session).stdout


def wait_for(session: str, condition: Callable[[str], bool], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = screen(session)
        if condition(text):
            return text
        assert time.monotonic() < deadline, f"the screen never showed what was expected:\n{text}"
        time.sleep(0.2)


async def greedy_conversation(runtime_dir: Path) -> str:
    """A new conversation sampled greedily, so the answer is the same on every run; the TUI opens
    the newest conversation."""
    async with Client(runtime_dir) as client:
        conversation: str = (await client.request("conversation.create", {}))["conversation"]["id"]
        await client.request("conversation.update", {"id": conversation, "settings": {"temperature": 0.0}})
    return conversation


async def stored_reply(runtime_dir: Path, conversation: str) -> str:
    """The conversation's last message, as the daemon stored it."""
    async with Client(runtime_dir) as client:
        last = (await client.request("conversation.get", {"id": conversation}))["messages"][-1]
    assert last["role"] == "assistant" and last["status"] == "complete", last
    return str(last["content"])


def words(text: str) -> list[str]:
    """The words of a text, without the Markdown marks, box lines and wrapping the screen adds."""
    return re.findall(r"[A-Za-z0-9]+", text)


def has_run(screen_words: list[str], tail: list[str]) -> bool:
    """Whether the words of `tail` appear one after another among the screen's."""
    return any(screen_words[i : i + len(tail)] == tail for i in range(len(screen_words)))


@pytest.mark.parametrize("term", ["xterm-256color", "screen"])
def test_ask_the_demo_model_in_tmux(demo_daemon: Any, term: str, tmp_path: Path) -> None:
    session = f"vc-{tmp_path.name[-12:]}"
    # COLORTERM would tell Textual the terminal has true colour whatever TERM says.
    command = (
        f"env -u COLORTERM TERM={term} VRAMCHAT_CONFIG={tmp_path / 'none.toml'} "
        f"{VRAMCHAT} --runtime-dir {demo_daemon.runtime_dir}"
    )
    conversation = asyncio.run(greedy_conversation(demo_daemon.runtime_dir))
    tmux(session, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command)
    try:
        wait_for(session, lambda s: "connected" in s and "(ready" in s)
        tmux(session, "send-keys", "-t", session, "-l", "What is the capital of France? Answer in English.")
        tmux(session, "send-keys", "-t", session, "Enter")
        answer = wait_for(session, lambda s: "tokens," in s and "tok/s" in s)
        reply = asyncio.run(stored_reply(demo_daemon.runtime_dir, conversation))
        assert "Paris" in reply, f"the stored reply:\n{reply}"
        # The log scrolls to the reply's end, so its last words are on screen however long it is.
        last_words = words(reply)[-4:]
        assert has_run(words(answer), last_words), f"the screen:\n{answer}\nthe stored reply:\n{reply}"
        tmux(session, "send-keys", "-t", session, "F2")
        wait_for(session, lambda s: "predicted" in s and "RAM" in s and "Back to chat" in s)
        tmux(session, "send-keys", "-t", session, "Escape")
        wait_for(session, lambda s: has_run(words(s), last_words))
        tmux(session, "send-keys", "-t", session, "C-q")
        deadline = time.monotonic() + 10
        while tmux(session, "has-session", "-t", session, check=False).returncode == 0:
            assert time.monotonic() < deadline, "vramchat did not quit on Ctrl+Q"
            time.sleep(0.1)
    finally:
        tmux(session, "kill-server", check=False)


SEEDED_REPLY = (
    "Reverse it with a slice:\n\n```python\nitems = [1, 2, 3]\nprint(items[::-1])\n```\n\nThat prints `[3, 2, 1]`, a new list."
)
SEEDED_CODE = "items = [1, 2, 3]\nprint(items[::-1])"


def seed_a_reply_with_code(daemon: DaemonProcess) -> None:
    """Store a chat whose reply holds a code block before the daemon starts: the same reply on every run."""
    store = Store(daemon.data_dir / "conversations.sqlite3")
    try:
        conversation = store.create_conversation("Reversing lists")["id"]
        store.add_message(conversation, "user", "How do I reverse a list in Python?")
        store.add_message(conversation, "assistant", SEEDED_REPLY, model="tiny.gguf")
    finally:
        store.close()


def run_from_the_palette(session: str, name: str) -> None:
    """Ctrl+P, type the entry's name, pick it once the palette lists it (the typed name and the entry)."""
    tmux(session, "send-keys", "-t", session, "C-p")
    wait_for(session, lambda s: "Search for commands" in s)
    tmux(session, "send-keys", "-t", session, "-l", name)
    wait_for(session, lambda s: s.count(name) >= 2)
    tmux(session, "send-keys", "-t", session, "Down", "Enter")


def tmux_buffer(session: str, expected: str, timeout: float = 20.0) -> str:
    """tmux's newest paste buffer, once it holds `expected` (or whatever it holds at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        buffer = tmux(session, "show-buffer", check=False).stdout
        if buffer == expected or time.monotonic() > deadline:
            return buffer
        time.sleep(0.2)


def test_copy_the_last_reply_and_code_block_reach_tmuxs_clipboard(daemon_factory: Any, models_dir: Path, tmp_path: Path) -> None:
    """OSC 52 from the real app, through tmux with set-clipboard on, as over SSH: the palette's
    copy entries put the stored reply, then its code block without the fences, in tmux's buffer."""
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), start=False)
    seed_a_reply_with_code(daemon)
    daemon.start()
    session = f"vc-{tmp_path.name[-12:]}"
    command = f"env VRAMCHAT_CONFIG={tmp_path / 'none.toml'} {VRAMCHAT} --runtime-dir {daemon.runtime_dir}"
    tmux(session, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command)
    try:
        tmux(session, "set-option", "-g", "set-clipboard", "on")
        wait_for(session, lambda s: "connected" in s and "a new list" in s)
        conversation = asyncio.run(only_conversation(daemon.runtime_dir))
        stored = asyncio.run(stored_reply(daemon.runtime_dir, conversation))
        assert stored == SEEDED_REPLY
        run_from_the_palette(session, "Copy the last reply")
        assert tmux_buffer(session, stored) == stored
        run_from_the_palette(session, "Copy the last code block")
        assert tmux_buffer(session, SEEDED_CODE) == SEEDED_CODE
    finally:
        tmux(session, "kill-server", check=False)


async def only_conversation(runtime_dir: Path) -> str:
    async with Client(runtime_dir) as client:
        (conversation,) = (await client.request("conversation.list"))["conversations"]
    return str(conversation["id"])
