"""keep_alive and `vramchat unload` (issue 23): an idle model gives its memory back, and the next
request loads it again with the same settings and is answered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from vramchat.shared.client import Client
from vramchat.tui.app import VramchatApp
from vramchat.tui.widgets import ChatMessage, MemoryBar, PromptInput

from helpers import DaemonFactory, DaemonProcess, until, wait_ready, wait_until


def vramchat(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


async def status_model(daemon: DaemonProcess) -> dict[str, Any]:
    async with Client(daemon.runtime_dir) as client:
        model: dict[str, Any] = (await client.request("status"))["model"]
        return model


def engine_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_keep_alive_unloads_an_idle_model_and_the_next_ask_loads_it_again(
    daemon_factory: DaemonFactory, models_dir: Path
) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), "--ctx", "1024", "--keep-alive", "2s")
    async with Client(daemon.runtime_dir) as client:
        loaded = await wait_ready(client)
    engine = psutil.Process(loaded["engine_pid"])
    assert engine.memory_info().rss > 10 << 20  # llama.cpp and the model: what must go back

    async def unloaded() -> dict[str, Any] | None:
        model = await status_model(daemon)
        return model if model["state"] == "unloaded" else None

    model = await until(unloaded, timeout=30, what="the idle model is unloaded")
    assert "keep_alive" in model["unloaded_reason"] and model["engine_pid"] is None and model["split"] is None
    wait_until(lambda: engine_gone(engine.pid), timeout=10, what="the engine process exits, its memory with it")

    async def no_engine_memory() -> bool:
        async with Client(daemon.runtime_dir) as client:
            return (await client.request("status"))["telemetry"]["engine"] is None

    await until(no_engine_memory, timeout=20, what="telemetry counts no engine memory")

    answered = vramchat(daemon, "ask", "--max-tokens", "5", "hello")
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr
    # Loaded again (and, 2 s later, unloaded again: either state may show now), as it was.
    again = await status_model(daemon)
    assert (again["name"], again["n_ctx"], again["n_gpu_layers"]) == (loaded["name"], 1024, loaded["n_gpu_layers"])
    assert "a request came: loading" in daemon.log() and daemon.log().count("loaded " + str(models_dir)) == 2


async def test_vramchat_unload_gives_the_memory_back_at_once(tiny_daemon: DaemonProcess) -> None:
    async with Client(tiny_daemon.runtime_dir) as client:
        engine_pid = (await wait_ready(client))["engine_pid"]
    unloaded = vramchat(tiny_daemon, "unload")
    assert unloaded.returncode == 0 and "unloaded tiny.gguf" in unloaded.stdout, unloaded.stderr
    wait_until(lambda: engine_gone(engine_pid), timeout=10, what="the engine process exits")
    model = await status_model(tiny_daemon)
    assert model["state"] == "unloaded" and "vramchat unload" in model["unloaded_reason"]
    again = vramchat(tiny_daemon, "unload")
    assert again.returncode == 0 and "nothing to unload" in again.stdout
    answered = vramchat(tiny_daemon, "ask", "--max-tokens", "5", "hello")
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr


async def test_the_tui_shows_the_unloaded_model_and_a_message_loads_it_again(
    daemon_factory: DaemonFactory, models_dir: Path
) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"), "--keep-alive", "1s")
    app = VramchatApp(Client(daemon.runtime_dir, name="vramchat tui"))
    async with app.run_test(size=(80, 24)) as pilot:

        async def shown_unloaded() -> str | None:
            await pilot.pause(0.05)
            bar = str(app.query_one(MemoryBar).render())
            return bar if app.state.model.get("state") == "unloaded" and "unloaded" in bar else None

        bar = await until(shown_unloaded, timeout=30, what="the memory bar shows the model unloaded")
        assert "loads again on the next message" in bar
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.insert("hello")
        await pilot.press("enter")

        async def answered() -> dict[str, Any] | None:
            await pilot.pause(0.05)
            replies = [w.message for w in app.query(ChatMessage) if w.message["role"] == "assistant"]
            return replies[-1] if replies and replies[-1]["status"] != "generating" else None

        reply = await until(answered, timeout=60, what="the message is answered once the model is loaded again")
        assert reply["status"] == "complete" and reply["content"], reply
