"""`vramchat pull`: get a model from the Hugging Face Hub.

`--list` plans the repo's quantizations for this machine (hub_list.py). Otherwise the daemon
downloads one, so that closing this terminal or the SSH session stops nothing, and this command
draws its progress from the daemon's `download` events until it ends. Ctrl+C only detaches:
`vramchat pull` lists the downloads, and `vramchat pull --cancel ID` stops one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from vramchat.shared.protocol import Event
from vramchat.shared.units import format_bytes, format_duration, parse_size
from vramchat.tui.commands import hub_list
from vramchat.tui.commands.common import open_client, print_json

ENDED = ("complete", "error", "cancelled")
BAR = 24


def register(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser(
        "pull",
        help="get a model from the Hugging Face Hub (--list: plan its quantizations first); no REPO: list the downloads",
    )
    pull.add_argument(
        "repo", nargs="?", metavar="REPO[:QUANT]", help="OWNER/NAME, with the quantization to get (default: the recommended one)"
    )
    pull.add_argument("--list", action="store_true", help="plan every quantization of REPO for this machine, and recommend one")
    pull.add_argument("--revision", help="a branch, tag or commit of the repo (default: main)")
    pull.add_argument("--cancel", metavar="ID", help="stop the download ID (see `vramchat pull`) and remove its partial files")
    pull.add_argument("--json", action="store_true")
    plan = pull.add_argument_group("planning, with --list")
    plan.add_argument("--vram", type=parse_size, help="plan for this much free VRAM instead of the daemon's machine's")
    plan.add_argument("--ram", type=parse_size, help="plan for this much available RAM instead of the daemon's machine's")
    plan.add_argument("--ctx", type=int, help="context window in tokens (default 4096)")
    plan.add_argument("--min-speed", type=float, help="the slowest tok/s a recommendation may give (default 5)")
    pull.set_defaults(handler=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int | Coroutine[Any, Any, int]:
    if args.cancel:
        return cancel(args)
    if not args.repo:
        if args.list:
            print("vramchat pull: --list needs a repo: vramchat pull OWNER/NAME --list", file=sys.stderr)
            return 2
        return list_downloads(args)
    if args.list:
        return hub_list.cmd_pull_list(args)
    return download(args)


async def download(args: argparse.Namespace) -> int:
    """Ask the daemon for the pull, then follow it; 0 once it is complete."""
    repo, _, quant = args.repo.partition(":")
    body = {"repo": repo, **({"quant": quant} if quant else {}), **({"revision": args.revision} if args.revision else {})}
    async with open_client(args, "pull") as client:
        await client.subscribe()  # first: no event of this pull can pass unseen
        events = client.raw_events()
        # Without a quant the daemon reads every quantization's headers to recommend one.
        accepted = await client.request("pull", body, timeout=300)
        view, position = accepted["download"], accepted["position"]
        ahead = f", after {position} other pull{'s' if position > 1 else ''}" if position else ""
        files = len(view["files"])
        print(
            f"pulling {view['repo']}:{view['quant']} ({format_bytes(view['total_bytes'])} in {files} file"
            f"{'s' if files > 1 else ''}{ahead}) as download {view['id']}",
            file=sys.stderr,
        )
        try:
            view = await follow(events, view)
        except asyncio.CancelledError:  # Ctrl+C
            print(
                f"\ndetached: the daemon goes on with download {view['id']}; `vramchat pull {view['repo']}:{view['quant']}` "
                f"follows it again, `vramchat pull --cancel {view['id']}` stops it",
                file=sys.stderr,
            )
            raise
    if args.json:
        print_json(view)
    elif view["state"] == "complete":
        print(f"{view['model_path']}\nload it with: vramchat load {view['model_path']}")
    if view["state"] != "complete":
        print(f"vramchat pull: download {view['id']} {view['state']}: {view['error'] or 'by a client'}", file=sys.stderr)
        return 1
    return 0


async def follow(events: AsyncIterator[Event], view: dict[str, Any]) -> dict[str, Any]:
    """Draw `view`'s progress on stderr, one line redrawn, until the download ends; its last view."""
    width = draw(view, 0)
    if view["state"] not in ENDED:
        async for event in events:
            if event.topic == "download" and event.body.get("id") == view["id"]:
                view = event.body
                width = draw(view, width)
                if view["state"] in ENDED:
                    break
    print(file=sys.stderr)
    return view


def draw(view: dict[str, Any], width: int) -> int:
    """Redraw the progress line over the last one (`width` wide); the new line's width."""
    line = progress_line(view)
    print(f"\r{line.ljust(width)}", end="", file=sys.stderr, flush=True)
    return len(line)


def progress_line(view: dict[str, Any]) -> str:
    """ "Q4_K_M [#########...............]  37%  36.2 MiB/98.0 MiB  12.1 MiB/s  5s left"."""
    done, total = view["done_bytes"], view["total_bytes"]
    fraction = done / total if total else 1.0
    filled = int(fraction * BAR)
    bar = f"[{'#' * filled}{'.' * (BAR - filled)}]"
    line = f"{view['quant']} {bar} {fraction * 100:3.0f}%  {format_bytes(done)}/{format_bytes(total)}"
    rate, eta = view.get("rate_bps"), view.get("eta_s")
    if view["state"] != "downloading" or rate is None:
        return f"{line}  {view['state']}"
    if not rate:
        return f"{line}  stalled"
    return f"{line}  {format_bytes(int(rate))}/s  {format_duration(round(eta or 0))} left"


async def cancel(args: argparse.Namespace) -> int:
    async with open_client(args, "pull") as client:
        result = await client.request("pull.cancel", {"id": args.cancel})
    if args.json:
        print_json(result)
    else:
        view = result["download"]
        print(f"cancelled download {view['id']} of {view['repo']}:{view['quant']}; its partial files are removed")
    return 0


async def list_downloads(args: argparse.Namespace) -> int:
    """The daemon's downloads, under way, queued and lately finished, one line each."""
    async with open_client(args, "pull") as client:
        downloads = (await client.request("status")).get("downloads", [])
    if args.json:
        print_json(downloads)
        return 0
    if not downloads:
        print("no downloads; get a model with `vramchat pull REPO[:QUANT]` (`vramchat pull REPO --list` plans them first)")
    for view in downloads:
        print(f"{view['id']}  {view['repo']}  {progress_line(view)}")
        if view["error"]:
            print(f"  {view['error']}")
    return 0
