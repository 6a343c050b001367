"""The models screen gets a model from the Hub (issue 21): the quant table with its plans, a pick,
the daemon's download moving in the TUI, then the load dialog for the downloaded file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from textual.widgets import DataTable, Input

from vramchat.shared.client import Client
from vramchat.tui.app import VramchatApp
from vramchat.tui.hub_dialog import HubDialog
from vramchat.tui.models_screen import LoadDialog, ModelsScreen

from helpers import DaemonFactory
from hub_repos import INSTRUCT_REPO
from hub_standin import HubStandin

PICKED = "Q2_K"


async def until(pilot: Any, condition: Any, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await pilot.pause(0.05)


async def test_the_models_screen_gets_a_model_from_the_hub_and_offers_to_load_it(
    daemon_factory: DaemonFactory, models_dir: Path, hub_standin: HubStandin
) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"))
    app = VramchatApp(Client(daemon.runtime_dir, name="vramchat tui"))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connected and app.state.model.get("state") == "ready")
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, HubDialog))
        dialog = app.screen
        assert isinstance(dialog, HubDialog)
        dialog.query_one("#repo", Input).value = INSTRUCT_REPO
        await pilot.press("enter")
        table = dialog.query_one("#quants", DataTable)
        await until(pilot, lambda: table.row_count > 0)
        assert dialog.result is not None
        quants = [q["quant"] for q in dialog.result["quants"]]
        assert set(quants) == {"Q8_0", "Q4_K_M", "Q2_K"} and all(q["plan"] for q in dialog.result["quants"])
        # Slow enough that the download takes a few seconds, whatever the machine: the bar must move.
        size = next(q["size_bytes"] for q in dialog.result["quants"] if q["quant"] == PICKED)
        hub_standin.throttle(size / 4)
        table.move_cursor(row=quants.index(PICKED))
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, LoadDialog), timeout=120)
        load = app.screen
        assert isinstance(load, LoadDialog)
        assert len(set(dialog.progress_seen)) >= 10, dialog.progress_seen
        assert dialog.progress_seen == sorted(dialog.progress_seen)
        assert load.model["name"] == f"{INSTRUCT_REPO}:{PICKED}" and Path(load.model["path"]).is_file()
        assert "models--vramchat-test--SmolLM2-135M-Instruct-GGUF" in load.model["path"]
