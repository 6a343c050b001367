"""`vramchat models` and `vramchat load`: what the daemon can load, and loading it with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

from vramchat.shared import load_options
from vramchat.shared.client import Client
from vramchat.shared.load_plan import Machine
from vramchat.tui import model_table
from vramchat.tui.commands.common import describe_model, format_plan_against_split, open_client, print_json


def register(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="the models the daemon can load")
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=cmd_models)

    load = commands.add_parser("load", help="load a model (by name from `vramchat models`, or a path)")
    load.add_argument("model")
    load.add_argument(
        "--gpu-layers",
        type=_gpu_layers,
        help='layers to put in VRAM (0 .. the model\'s layers + 1), or "auto" to fit --vram-budget',
    )
    load.add_argument(
        "--vram-budget",
        help="with --gpu-layers auto: VRAM to fill, e.g. 11.5GiB or RPC0=2GiB,CUDA0=10GiB (default: free - 1 GiB each)",
    )
    load.add_argument("--force", action="store_true", help="load even if the planner predicts the system would swap")
    load.add_argument("--ctx", type=int, help="context window in tokens")
    load.add_argument("--threads", type=int, help="CPU threads")
    load.add_argument("--json", action="store_true")
    load_options.add_arguments(load)
    load.set_defaults(handler=cmd_load)

    unload = commands.add_parser(
        "unload", help="stop the engine now, giving back its VRAM and RAM; the next request loads the model again"
    )
    unload.add_argument("--json", action="store_true")
    unload.set_defaults(handler=cmd_unload)


async def cmd_models(args: argparse.Namespace) -> int:
    """The models as the models screen lists them, in the columns that fit the terminal."""
    async with open_client(args, "models") as client:
        listed = await client.request("models")
        telemetry = None if args.json else (await client.request("status")).get("telemetry")
    if args.json:
        print_json(listed)
        return 0
    if not listed["models"]:
        print("no models found; add a directory with `vramchatd --models-dir DIR` or model_dirs in the config")
        return 0
    host = Machine.from_sample(telemetry)
    rows = [model_table.describe(model, host, loaded="* ", unloaded="  ") for model in listed["models"]]
    home = str(Path.home())
    for row in rows:
        row["source"] = "~" + row["source"][len(home) :] if row["source"].startswith(home + "/") else row["source"]
    columns = (*model_table.COLUMNS, model_table.SOURCE)
    print("\n".join(model_table.text_table(rows, columns, shutil.get_terminal_size().columns)))
    return 0


async def cmd_load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "force": args.force, **load_options.request_fields(args)}
    for name, value in (
        ("n_gpu_layers", args.gpu_layers),
        ("n_ctx", args.ctx),
        ("n_threads", args.threads),
        ("vram_budget", args.vram_budget),
    ):
        if value is not None:
            body[name] = value
    async with open_client(args, "load") as client:
        await client.subscribe()
        progress = asyncio.create_task(_show_load_progress(client))
        try:
            result = await client.request("load", body, timeout=None)
        finally:
            progress.cancel()
    if args.json:
        print_json(result)
    else:
        model = result["model"]
        print(describe_model(model))
        print(format_plan_against_split(model))
    return 0


async def cmd_unload(args: argparse.Namespace) -> int:
    async with open_client(args, "unload") as client:
        result = await client.request("unload", timeout=None)
    model = result["model"]
    if args.json:
        print_json(result)
    elif result["unloaded"]:
        print(f"unloaded {model['name']}: its engine has exited; the next request loads it again with the same settings")
    else:
        print(f"nothing to unload: the model is {model['state']}")
    return 0


def _gpu_layers(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


async def _show_load_progress(client: Client) -> None:
    """A one-line progress bar on stderr from the daemon's `model` events."""
    async for event in client.raw_events():
        if event.topic == "model" and event.body.get("state") == "loading" and event.body.get("progress") is not None:
            done = int(event.body["progress"] * 30)
            bar = f"[{'#' * done}{'.' * (30 - done)}] {event.body['progress'] * 100:3.0f}%"
            # Loads queue: the one before this one may be the one moving.
            print(f"\rloading {event.body.get('name')} {bar}", end="", file=sys.stderr, flush=True)
            if event.body["progress"] >= 1.0:
                print(file=sys.stderr)
