"""The real `vramchat` in a real terminal (tmux): ask the demo model a question, read the answer
off the screen, open the dashboard, quit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

VRAMCHAT = Path(sys.executable).parent / "vramchat"



@pytest.fixture(autouse=True)
def tmux() -> None:
    """`make test` installs tmux (scripts/install-test-tools.sh); without it this test fails, not skips."""
    assert shutil.which("tmux"), "tmux is not installed: run scripts/install-test-tools.sh (or apt-get install -y tmux)"


def screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True).stdout


def wait_for(session: str, condition: Callable[[str], bool], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = screen(session)
        if condition(text):
            return text
        assert time.monotonic() < deadline, f"the screen never showed what was expected:\n{text}"
        time.sleep(0.2)


@pytest.mark.parametrize("term", ["xterm-256color", "screen"])
def test_ask_the_demo_model_in_tmux(demo_daemon: Any, term: str, tmp_path: Path) -> None:
    session = f"vc-{tmp_path.name[-12:]}"
    # COLORTERM would tell Textual the terminal has true colour whatever TERM says.
    command = f"env -u COLORTERM TERM={term} VRAMCHAT_CONFIG={tmp_path / 'none.toml'} {VRAMCHAT} --runtime-dir {demo_daemon.runtime_dir}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True)
    try:
        wait_for(session, lambda s: "connected" in s and "(ready" in s)
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", "What is the capital of France?"], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        answer = wait_for(session, lambda s: "tokens," in s and "tok/s" in s)
        assert "Paris" in answer
        subprocess.run(["tmux", "send-keys", "-t", session, "F2"], check=True)
        wait_for(session, lambda s: "predicted" in s and "RAM" in s and "Back to chat" in s)
        subprocess.run(["tmux", "send-keys", "-t", session, "Escape"], check=True)
        wait_for(session, lambda s: "Paris" in s)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], check=True)
        deadline = time.monotonic() + 10
        while subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "vramchat did not quit on Ctrl+Q"
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
