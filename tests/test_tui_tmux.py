"""The real `vramchat` in a real terminal (tmux): ask the demo model a question, read the answer
off the screen, open the dashboard, quit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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


@pytest.mark.parametrize("term", ["xterm-256color", "screen"])
def test_ask_the_demo_model_in_tmux(demo_daemon: Any, term: str, tmp_path: Path) -> None:
    session = f"vc-{tmp_path.name[-12:]}"
    # COLORTERM would tell Textual the terminal has true colour whatever TERM says.
    command = (
        f"env -u COLORTERM TERM={term} VRAMCHAT_CONFIG={tmp_path / 'none.toml'} "
        f"{VRAMCHAT} --runtime-dir {demo_daemon.runtime_dir}"
    )
    tmux(session, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command)
    try:
        wait_for(session, lambda s: "connected" in s and "(ready" in s)
        tmux(session, "send-keys", "-t", session, "-l", "What is the capital of France? Answer in English.")
        tmux(session, "send-keys", "-t", session, "Enter")
        answer = wait_for(session, lambda s: "tokens," in s and "tok/s" in s)
        assert "Paris" in answer
        tmux(session, "send-keys", "-t", session, "F2")
        wait_for(session, lambda s: "predicted" in s and "RAM" in s and "Back to chat" in s)
        tmux(session, "send-keys", "-t", session, "Escape")
        wait_for(session, lambda s: "Paris" in s)
        tmux(session, "send-keys", "-t", session, "C-q")
        deadline = time.monotonic() + 10
        while tmux(session, "has-session", "-t", session, check=False).returncode == 0:
            assert time.monotonic() < deadline, "vramchat did not quit on Ctrl+Q"
            time.sleep(0.1)
    finally:
        tmux(session, "kill-server", check=False)
