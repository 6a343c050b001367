"""`vramchat pull REPO --list`: a Hub repo's quantizations, each planned from its GGUF headers for
the machine that would load it, and the one to take. tui/commands/pull.py registers the command.

The machine is the daemon's when one answers (what it holds counts as free, as for a reload, and
a remote daemon's machine is where the model would run), else this one as `vramchat plan` sees
it; `--vram` and `--ram` replace either, to plan for another machine. The load options, n_ctx
and ram_budget are the config's, as the daemon's own recommendation for `vramchat pull REPO` has them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from dataclasses import replace
from typing import Any

import psutil

from vramchat.shared.client import Client, DaemonNotRunning, RequestFailed
from vramchat.shared.config import ConfigError, load_config
from vramchat.shared.load_options import settings_from
from vramchat.shared.load_plan import Machine
from vramchat.shared.planner import PlanError
from vramchat.shared.units import format_bytes
from vramchat.tui.commands.common import print_json
from vramchat.tui.commands.plan import this_machine_vram

WIDTH = 80
RECOMMENDED, NO_TEMPLATE = "*", "!"
# Column titles and widths, but the quant's, which takes what is left of WIDTH.
COLUMNS = (("size", 11), ("bits", 5), ("where", 26), ("swap", 4), ("tok/s", 7), ("files", 5))


def cmd_pull_list(args: argparse.Namespace) -> int:
    """The quant table (or plan_repo's JSON with --json); 1 with one line on stderr if the Hub fails."""
    from vramchat.shared import hub  # huggingface_hub takes 0.2 s to import: only the commands asking the Hub pay it

    repo, _, wanted = args.repo.partition(":")
    min_speed = hub.DEFAULT_MIN_SPEED if args.min_speed is None else args.min_speed
    try:
        config = load_config()
        settings = settings_from({}, config.load_defaults(), args.ctx or config.n_ctx)
        machine, where = planned_machine(args, config.ram_budget)
        listing = hub.list_quants(repo, args.revision)
        if wanted:
            chosen = [q for q in listing.quants if q.name.lower() == wanted.lower()]
            if not chosen:
                names = ", ".join(q.name for q in listing.quants)
                raise hub.HubError(f"{repo} has no quantization {wanted}: it has {names}")
            listing = hub.RepoListing(listing.repo, listing.revision, chosen)
        result = hub.plan_repo(listing, machine, settings, min_speed=min_speed)
    except (hub.HubError, PlanError, ConfigError) as exc:
        print(f"vramchat pull: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
        return 0
    print("\n".join(table(result, where, settings.n_ctx)))
    return 0


def planned_machine(args: argparse.Namespace, ram_budget: int | None = None) -> tuple[Machine, str]:
    """The Machine to plan for, and how the table's first line names it; without --ram, the RAM
    counted on is capped at the config's ram_budget, as the daemon's swap guard caps it."""
    sample = None if args.vram is not None and args.ram is not None else daemon_sample(args)
    daemon = Machine.from_sample(sample) if sample is not None else None
    if args.vram is not None:
        machine, where = Machine(args.vram), f"another machine: {format_bytes(args.vram)} free VRAM (given)"
    elif daemon is not None:
        machine = daemon
        where = "the daemon's machine: " + (
            ", ".join(f"{d.name} {format_bytes(d.free)} free" for d in daemon.devices) or "no GPU"
        )
    else:
        free_vram, gpu_name = this_machine_vram()
        machine = Machine(free_vram, 0, gpu_name)
        where = "this machine: " + (f"{format_bytes(free_vram)} free VRAM on {gpu_name}" if gpu_name else "no GPU")
    if args.ram is not None:
        ram, where = args.ram, f"{where}, {format_bytes(args.ram)} RAM (given)"
    else:
        ram = daemon.available_ram if daemon is not None else psutil.virtual_memory().available
        ram = ram if ram_budget is None else min(ram, ram_budget)
        where = f"{where}, {format_bytes(ram)} RAM available"
    return replace(machine, available_ram=ram), where


def daemon_sample(args: argparse.Namespace) -> dict[str, Any] | None:
    """The running daemon's latest telemetry sample; None when no daemon answers within 3 s."""

    async def ask() -> dict[str, Any] | None:
        async with Client(getattr(args, "runtime_dir", None), name="vramchat pull", timeout=3) as client:
            return (await client.request("status")).get("telemetry")

    try:
        return asyncio.run(ask())
    except (DaemonNotRunning, RequestFailed, TimeoutError):
        return None


def table(result: dict[str, Any], where: str, n_ctx: int) -> list[str]:
    """The quant table in WIDTH columns, then the recommendation and the marks' meaning."""
    quants = result["quants"]
    fixed = 2 + sum(width + 1 for _, width in COLUMNS)
    width = max(6, min(max((len(q["quant"]) for q in quants), default=6), WIDTH - fixed))
    count = f"{len(quants)} quantization{'s' if len(quants) != 1 else ''}"
    head = f"{result['repo']} at {result['revision'][:12]}: {count} planned for {where}; n_ctx {n_ctx}"
    lines = textwrap.wrap(head, WIDTH, subsequent_indent="  ")
    lines.append("  " + "quant".ljust(width) + _cells([title for title, _ in COLUMNS]))
    errors = []
    for q in quants:
        marks = (RECOMMENDED if q["quant"] == result["recommended"] else " ") + (
            NO_TEMPLATE if q["chat_template"] is False else " "
        )
        name = q["quant"] if len(q["quant"]) <= width else q["quant"][: width - 1] + "…"
        size = format_bytes(q["size_bytes"])
        if q.get("error"):
            errors.append(f"{q['quant']}: {q['error']}")
            cells = [size, "", "not planned: see below", "", "", str(len(q["files"]))]
        else:
            swap = "YES" if q["would_swap"] else "no"
            cells = [size, f"{q['bits_per_weight']:.1f}", q["where"], swap, f"{q['tokens_per_s'] or 0:.1f}", str(len(q["files"]))]
        lines.append(marks + name.ljust(width) + _cells(cells))
    for error in errors:
        lines += textwrap.wrap(error, WIDTH, initial_indent="  ", subsequent_indent="    ")
    if result["recommended"] is None:
        lines += textwrap.wrap(f"no recommendation: {result['why']}", WIDTH, subsequent_indent="  ")
    else:
        lines += textwrap.wrap(f"{RECOMMENDED} recommended: {result['why']}", WIDTH, subsequent_indent="  ")
    if any(q["chat_template"] is False for q in quants):
        lines += textwrap.wrap(
            f"{NO_TEMPLATE} no chat template: a base model, which continues text rather than answering",
            WIDTH,
            subsequent_indent="  ",
        )
    lines.append("to download one: vramchat pull REPO:QUANT, or REPO alone for the recommended one")
    return lines


def _cells(cells: list[str]) -> str:
    """The columns after the quant's: numbers right-aligned, `where` left-aligned after two spaces."""
    pairs = zip(COLUMNS, cells, strict=True)
    return "".join(f"  {cell:<{w - 1}}" if title == "where" else f" {cell:>{w}}" for (title, w), cell in pairs)
