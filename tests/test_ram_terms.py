"""RAM as the kernel counts it, and load progress that moves (issue 13), on a 1 GB Q4_0 model.

On an AVX2 CPU ggml copies Q4_0 matrices out of the mapping into a CPU_REPACK buffer: llama.cpp
then logs both the whole mapped span and the repack buffer, yet the mapped pages of repacked
tensors are clean page cache. The planner's resident figure (planner.RamTerms) is held to what
the engine's /proc says, and the swap guard judges that figure.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.gguf import inspect_gguf
from vramchat.shared.planner import PlanSettings, _repacked, cpu_repack_types, predict
from vramchat.shared.units import format_bytes

from gguf_factory import RandomLlamaSpec, random_llama
from helpers import DaemonFactory, IsolatedHome, vramchat_status

MIB = 1 << 20
N_CTX = 1024

pytestmark = pytest.mark.skipif(not cpu_repack_types(), reason="needs a CPU whose ggml repacks Q4_0 (AVX2)")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.04 GB of Q4_0, in a directory of its own (the daemons below are given it with --models-dir)."""
    return random_llama(tmp_path_factory.mktemp("big"), RandomLlamaSpec(n_layer=28))


def non_repacked_read(path: Path) -> int:
    """Mapped bytes every token reads at n_gpu_layers 0: the layers' tensors ggml does not repack."""
    info = inspect_gguf(path)
    return sum(t.bytes for t in info.tensors if t.layer is not None and not _repacked(t, cpu_repack_types()))


async def engine_memory(client: Client) -> dict[str, Any]:
    for _ in range(100):
        engine = ((await client.request("status")).get("telemetry") or {}).get("engine") or {}
        if engine.get("anon_resident"):
            return engine
        await asyncio.sleep(0.2)
    raise AssertionError("no engine memory in telemetry")


async def test_resident_prediction_matches_the_engine_and_progress_moves(daemon_factory: DaemonFactory, big_model: Path) -> None:
    assert big_model.stat().st_size > 1e9
    daemon = daemon_factory("--no-load", "--models-dir", str(big_model.parent))
    async with Client(daemon.runtime_dir) as client:
        await client.subscribe()
        seen: list[float] = []

        async def watch() -> None:
            async for event in client.raw_events():
                if event.topic == "model" and event.body.get("progress") is not None:
                    seen.append(event.body["progress"])

        watcher = asyncio.create_task(watch())
        model = (await client.request("load", {"model": str(big_model), "n_gpu_layers": 0, "n_ctx": N_CTX}, timeout=300))["model"]
        await asyncio.sleep(0.2)
        watcher.cancel()
        inside = sorted({p for p in seen if 0 < p < 1})
        assert len(inside) >= 10, seen  # the bar moves, it does not jump from 0 to 1
        assert seen == sorted(seen) and seen[-1] == 1.0

        ram = model["plan"]["prediction"]["ram"]
        engine = await engine_memory(client)
        measured = engine["anon_resident"] + non_repacked_read(big_model)
        predicted = ram["anonymous"] + ram["mapped_read"]
        print(
            f"\n1 GB Q4_0 at n_gpu_layers 0: resident predicted {format_bytes(predicted)} (anonymous "
            f"{format_bytes(ram['anonymous'])} + mapped read {format_bytes(ram['mapped_read'])}, page cache "
            f"{format_bytes(ram['mapped_cache'])}); measured RssAnon {format_bytes(engine['anon_resident'])} + "
            f"non-repacked {format_bytes(non_repacked_read(big_model))} = {format_bytes(measured)}; "
            f"old figure {format_bytes(model['plan']['prediction']['cpu']['total'])}"
        )
        assert abs(predicted - measured) <= 0.10 * measured
        status = vramchat_status(daemon)
        assert f"RAM plan: resident {format_bytes(predicted)}" in status and "engine: anonymous" in status


async def test_the_guard_judges_the_resident_figure_not_the_logged_one(
    daemon_factory: DaemonFactory, big_model: Path, isolated_home: IsolatedHome
) -> None:
    info = inspect_gguf(big_model)
    prediction = predict(info, 0, PlanSettings(n_ctx=N_CTX))
    old, new = prediction.cpu.total, prediction.ram.resident
    assert new < 0.7 * old  # the mapped pages of repacked tensors no longer count twice
    between = (old + new) // 2
    isolated_home.config_file.write_text(f'ram_budget = "{between}"\n')
    daemon = daemon_factory("--no-load", "--models-dir", str(big_model.parent))
    async with Client(daemon.runtime_dir) as client:
        model = (await client.request("load", {"model": str(big_model), "n_gpu_layers": 0, "n_ctx": N_CTX}, timeout=300))["model"]
        assert model["state"] == "ready" and not model["plan"]["swap"]["would_swap"]
        # The same budget refuses what would really not fit: a context whose KV cache is larger.
        with pytest.raises(RequestFailed, match="would swap") as refused:
            await client.request("load", {"model": str(big_model), "n_gpu_layers": 0, "n_ctx": 65536}, timeout=300)
        assert refused.value.code == "would_swap"


async def test_the_tui_progress_bar_moves_through_a_1_gb_load(daemon_factory: DaemonFactory, big_model: Path) -> None:
    from test_tui_app import attach, until

    from vramchat.tui.models_screen import LoadDialog

    daemon = daemon_factory("--models-dir", str(big_model.parent))  # serving the tiny model; the dialog loads the big one
    app = attach(daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.connected and app.state.model.get("state") == "ready")
        dialog = LoadDialog({"name": big_model.name, "path": str(big_model)}, n_gpu_layers=0, n_ctx=N_CTX)
        await app.push_screen(dialog)
        await until(pilot, lambda: dialog.info is not None)
        await pilot.press("enter")
        await until(
            pilot, lambda: app.state.model.get("name") == big_model.name and app.state.model.get("state") == "ready", timeout=120
        )
        inside = [p for p in dialog.progress_seen if 0 < p < 1]  # what the bar held after each model event
        assert len(set(inside)) >= 10 and inside == sorted(inside), dialog.progress_seen
