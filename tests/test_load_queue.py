"""Loads queue (issue 23): one sent while another runs waits its turn and is then carried out."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from vramchat.shared.client import Client, RequestFailed

from helpers import DaemonFactory, wait_ready


def loaded_in_order(log: str) -> list[str]:
    """The model files the daemon's log says it loaded, in order."""
    return [Path(path).name for path in re.findall(r"loaded (\S+) in [0-9.]+ s", log)]


async def test_a_load_sent_right_after_start_waits_for_the_start_up_load(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    # Sent as soon as the socket exists: the start-up load has only begun (its engine is still
    # starting Python), and a load used to be refused with `busy` then.
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"))
    async with Client(daemon.runtime_dir) as client:
        reply = await client.request("load", {"model": "tiny-gqa.gguf", "n_ctx": 256}, timeout=120)
        assert reply["model"]["state"] == "ready" and reply["model"]["name"] == "tiny-gqa.gguf"
        model = await wait_ready(client)
    assert model["name"] == "tiny-gqa.gguf" and model["n_ctx"] == 256
    assert loaded_in_order(daemon.log()) == ["tiny.gguf", "tiny-gqa.gguf"]


async def test_two_loads_in_a_row_both_complete_in_order(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"))
    async with Client(daemon.runtime_dir) as client:
        await wait_ready(client)
        first, second = await asyncio.gather(
            client.request("load", {"model": "tiny-gqa.gguf", "n_ctx": 256}, timeout=120),
            client.request("load", {"model": "tiny.gguf", "n_ctx": 512}, timeout=120),
        )
        assert (first["model"]["name"], first["model"]["n_ctx"]) == ("tiny-gqa.gguf", 256)
        assert (second["model"]["name"], second["model"]["n_ctx"]) == ("tiny.gguf", 512)
        model = await wait_ready(client)
    assert (model["name"], model["n_ctx"]) == ("tiny.gguf", 512)
    assert loaded_in_order(daemon.log()) == ["tiny.gguf", "tiny-gqa.gguf", "tiny.gguf"]


async def test_a_load_that_can_never_succeed_is_refused_while_another_waits(
    daemon_factory: DaemonFactory, models_dir: Path
) -> None:
    """A wrong name is refused by itself, and the loads queued around it go on."""
    daemon = daemon_factory("--model", str(models_dir / "tiny.gguf"))
    async with Client(daemon.runtime_dir) as client:
        await wait_ready(client)
        results = await asyncio.gather(
            client.request("load", {"model": "tiny-gqa.gguf"}, timeout=120),
            client.request("load", {"model": "no-such-model.gguf"}, timeout=120),
            client.request("load", {"model": "tiny.gguf", "n_ctx": 300}, timeout=120),
            return_exceptions=True,
        )
    assert isinstance(results[1], RequestFailed) and results[1].code in ("not_found", "not_gguf"), results[1]
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception), results
    assert loaded_in_order(daemon.log())[-2:] == ["tiny-gqa.gguf", "tiny.gguf"]
