"""`vramchat status` and `vramchat top`: the daemon, the model and the memory, once or live."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from vramchat.shared.client import Snapshot
from vramchat.tui.commands.common import describe_model, format_plan_against_split, open_client, print_json
from vramchat.tui.state import HISTORY_KEPT
from vramchat.tui.telemetry_view import format_status, format_top, ram_line


def register(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="the daemon, the model and the memory now")
    status.add_argument("--json", action="store_true", help="raw numbers, in bytes")
    status.set_defaults(handler=cmd_status)

    top = commands.add_parser("top", help="a live memory view in the plain terminal (q or Ctrl-C quits)")
    top.set_defaults(handler=cmd_top)


async def cmd_status(args: argparse.Namespace) -> int:
    async with open_client(args, "status") as client:
        status = await client.request("status")
    if args.json:
        print_json(status)
        return 0
    daemon, model, queue = status["daemon"], status["model"], status["queue"]
    print(
        f"vramchatd {daemon['version']}  pid {daemon['pid']}  up {daemon['uptime_s']:.0f} s  "
        f"{daemon['clients']} client(s) attached"
    )
    for name, task in (daemon.get("tasks") or {}).items():
        if task["restarts"]:  # a bug: the daemon went on, and says so
            print(f"daemon task {name} failed and was started again {task['restarts']} time(s); last: {task['last_error']}")
    print(describe_model(model))
    if model.get("state") == "ready":
        print(format_plan_against_split(model))
        if line := ram_line(model, (status["telemetry"] or {}).get("engine")):
            print(line)
    print(f"queue: {'1 running' if queue['running'] else 'idle'}, {len(queue['pending'])} waiting")
    for job in filter(None, [queue["running"], *queue["pending"]]):
        if job.get("label"):  # a request from outside vramchat, such as the HTTP API
            where = "running" if job["position"] == 0 else f"queued #{job['position']}"
            print(f"  {where}: {job['label']}")
    print(format_status(status["telemetry"], status["alarms"]))
    return 0


async def cmd_top(args: argparse.Namespace) -> int:
    """Redraws in place on every telemetry event, from a snapshot's history on."""
    async with open_client(args, "top") as client:
        history: list[dict[str, Any]] = []
        model: dict[str, Any] = {}
        async for item in client.stream():
            if isinstance(item, Snapshot):
                history = list(item.body["telemetry"]["history"])
                model = item.body["model"]
                continue
            if item.topic == "model":
                model = item.body
            elif item.topic == "telemetry":
                history.append(item.body)
                del history[:-HISTORY_KEPT]
                width = shutil.get_terminal_size().columns
                sys.stdout.write("\x1b[H\x1b[2J" + format_top(item.body, history, model, width) + "\n")
                sys.stdout.flush()
    return 0
