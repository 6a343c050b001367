"""Driving the app as a person does, for the Pilot tests: wait for a condition, run a command
palette entry by its name, see which message has the focus."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from textual.command import CommandList, CommandPalette

from vramchat.tui.app import VramchatApp
from vramchat.tui.widgets import ChatMessage


async def until(pilot: Any, condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await pilot.pause(0.02)


async def palette(pilot: Any, app: VramchatApp, name: str) -> None:
    """Ctrl+P, type the entry's name, Enter: as a person runs it."""
    await pilot.press("ctrl+p")
    await until(pilot, lambda: isinstance(app.screen, CommandPalette))
    await pilot.press(*name)
    commands = app.screen.query_one(CommandList)
    await until(pilot, lambda: commands.option_count and str(commands.get_option_at_index(0).prompt).startswith(name))
    await pilot.press("down", "enter")
    await until(pilot, lambda: not isinstance(app.screen, CommandPalette))


def focused_id(app: VramchatApp) -> str | None:
    return app.focused.message["id"] if isinstance(app.focused, ChatMessage) else None
