"""`vramchat rpc-server`: lend this machine's devices to a vramchatd elsewhere, over llama.cpp's RPC.

The server itself needs llama.cpp, which this package never imports: the command replaces this
process with `python -m vramchat.daemon.llama.rpc` (daemon/llama/rpc.py), which serves in the foreground.
"""

from __future__ import annotations

import argparse
import os
import sys

from vramchat.shared.rpc_endpoints import DEFAULT_LISTEN, DEFAULT_PORT, TUNNEL_HINT, EndpointError, is_loopback, parse_endpoint

EPILOG = f"""\
llama.cpp's RPC has NO authentication and NO encryption: anyone who reaches the port can run work
on the devices and read the model and the activations sent to them. It listens on {DEFAULT_LISTEN}
by default. To use it from the machine that runs vramchatd, carry it over SSH instead of opening it:

  on the daemon's machine:  {TUNNEL_HINT}
                            vramchatd --rpc 127.0.0.1:{DEFAULT_PORT}   (or rpc_servers in the config)

Binding any other address needs --insecure-remote, and prints a warning.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "rpc-server",
        help="serve this machine's GPUs (else its CPU) to a vramchatd elsewhere, over llama.cpp RPC",
        description="Serve this machine's devices (its CUDA GPUs where present, else the CPU and its RAM)\n"
        "over llama.cpp's RPC, in the foreground, so that a vramchatd elsewhere offloads layers\n"
        "to them as to a local GPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help="where to listen (default %(default)s)")
    command.add_argument(
        "--device",
        action="append",
        metavar="NAME",
        help="serve only this device, as ggml names it: CUDA0, CPU, ... (repeatable; see --list-devices)",
    )
    command.add_argument("--threads", type=int, metavar="N", help="CPU threads for a served CPU (default: every CPU)")
    command.add_argument(
        "--insecure-remote",
        action="store_true",
        help="allow a --listen address other than loopback, WITHOUT authentication or encryption",
    )
    command.add_argument("--list-devices", action="store_true", help="print this machine's devices and exit")
    command.set_defaults(handler=run)


def check(args: argparse.Namespace) -> str | None:
    """Why these arguments cannot be served (None when they can)."""
    try:
        host, _ = parse_endpoint(args.listen)
    except EndpointError as exc:
        return str(exc)
    if not is_loopback(host) and not args.insecure_remote:
        return (
            f"{args.listen} is not a loopback address, and llama.cpp's RPC has no authentication or encryption. "
            f"Listen on {DEFAULT_LISTEN} and reach it over SSH (`{TUNNEL_HINT}`), or pass --insecure-remote"
        )
    if args.threads is not None and args.threads < 1:
        return "--threads must be at least 1"
    return None


def server_argv(args: argparse.Namespace) -> list[str]:
    """The command line of the server process this command becomes."""
    argv = [sys.executable, "-m", "vramchat.daemon.llama.rpc", "--listen", args.listen]
    for device in args.device or []:
        argv += ["--device", device]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.insecure_remote:
        argv.append("--insecure-remote")
    if args.list_devices:
        argv.append("--list-devices")
    return argv


def run(args: argparse.Namespace) -> int:
    if not args.list_devices and (reason := check(args)):
        print(f"vramchat rpc-server: {reason}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    argv = server_argv(args)
    os.execv(argv[0], argv)  # never returns
    return 1  # pragma: no cover
