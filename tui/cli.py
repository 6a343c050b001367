"""`vramchat`: the TUI (no subcommand), and the parser that assembles the plain-terminal subcommands.

Every subcommand talks to the daemon through vramchat.shared.client, prints data as JSON with
--json, and exits non-zero with a one-line message when the daemon is not running. Each family
of subcommands lives in vramchat.tui.commands.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from vramchat.shared import __version__
from vramchat.shared.client import DaemonNotRunning, RequestFailed
from vramchat.tui.commands import api_key, ask, conversations, doctor, models, plan, pull, rpc_server, service, status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = getattr(args, "handler", None) or open_tui
    try:
        result = handler(args)
        return asyncio.run(result) if asyncio.iscoroutine(result) else int(result)
    except (DaemonNotRunning, RequestFailed) as exc:
        print(f"vramchat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vramchat plan ... | head`
        sys.stderr.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vramchat", description="Chat with GGUF models bigger than your GPU.")
    parser.add_argument("--runtime-dir", help="the daemon's socket directory (env VRAMCHAT_RUNTIME_DIR)")
    parser.add_argument("--version", action="version", version=f"vramchat {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for family in (ask, status, models, conversations, plan, pull, service, api_key, doctor, rpc_server):
        family.register(commands)
    return parser


def open_tui(args: argparse.Namespace) -> int | Coroutine[Any, Any, int]:
    """The Textual app in a terminal; the line-by-line chat when there is no terminal."""
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        return ask.run_interactive(args)
    from vramchat.tui.app import run_app  # Textual is slow to import: only when the TUI opens

    return run_app(args.runtime_dir)


if __name__ == "__main__":
    sys.exit(main())
