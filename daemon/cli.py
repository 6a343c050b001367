"""`vramchatd`: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from vramchat.daemon import curve
from vramchat.daemon.server import Daemon, DaemonSettings
from vramchat.daemon.store import Store, StoreError
from vramchat.shared import __version__, paths, scheduling
from vramchat.shared.config import ConfigError, load_config
from vramchat.shared.paths import UnsafeDirectoryError
from vramchat.shared.rpc_endpoints import EndpointError, parse_endpoint
from vramchat.shared.units import parse_duration


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vramchatd", description="vramchat daemon: holds the model, serves chats and memory telemetry"
    )
    parser.add_argument("--version", action="version", version=f"vramchatd {__version__}")
    parser.add_argument("--runtime-dir", help="socket directory (env VRAMCHAT_RUNTIME_DIR; default $XDG_RUNTIME_DIR/vramchat)")
    parser.add_argument("--data-dir", help="conversation store directory (env VRAMCHAT_DATA_DIR; default the XDG data dir)")
    parser.add_argument("--config", help="TOML config file (env VRAMCHAT_CONFIG; default the XDG config dir)")
    parser.add_argument(
        "--models-dir", action="append", default=[], metavar="DIR", help="scan DIR for *.gguf (repeatable; adds to model_dirs)"
    )
    parser.add_argument("--model", help="model to load at start (default: default_model from the config, else the demo model)")
    parser.add_argument("--no-load", action="store_true", help="start without loading a model")
    parser.add_argument("--gpu-layers", type=int, help="n_gpu_layers for loads that do not say")
    parser.add_argument("--ctx", type=int, help="n_ctx for loads that do not say")
    parser.add_argument("--threads", type=int, help="CPU threads for loads that do not say")
    parser.add_argument(
        "--rpc",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="offload to the devices of the `vramchat rpc-server` at HOST:PORT (repeatable; adds to rpc_servers)",
    )
    parser.add_argument(
        "--socket-mode",
        choices=("private", "group"),
        default="private",
        help="private: only this user may attach (runtime dir 0700); group: members of the "
        "directory's group may too (0750, for the system service)",
    )
    parser.add_argument(
        "--tcp", metavar="HOST:PORT", help="also serve TCP (control on PORT, events on PORT+1) with CURVE; config tcp_listen"
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the OpenAI-compatible API here, e.g. 127.0.0.1:8080 (config http_listen); key: `vramchat api-key`",
    )
    parser.add_argument(
        "--insecure-tcp",
        action="store_true",
        help="serve --tcp WITHOUT encryption or authentication: anyone who reaches the port can read every chat",
    )
    parser.add_argument(
        "--telemetry-interval",
        type=float,
        default=DaemonSettings.telemetry_interval_s,
        metavar="SECONDS",
        help="memory sampling interval (default %(default)s)",
    )
    parser.add_argument(
        "--unwatched-telemetry-interval",
        type=float,
        default=DaemonSettings.unwatched_telemetry_interval_s,
        metavar="SECONDS",
        help="sampling interval while no client is attached and nothing generates or loads (default %(default)s)",
    )
    parser.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="unload the model after this long without a request, e.g. 30m (config keep_alive; default: never); "
        "the next request loads it again",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    keys = commands.add_parser("keys", help="create or show the CURVE keys for TCP clients")
    curve.add_keys_arguments(keys)
    keys.set_defaults(handler=curve.keys_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "handler", None):
        return args.handler(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vramchatd: {exc}", file=sys.stderr)
        return 2
    for flag, seconds in (
        ("--telemetry-interval", args.telemetry_interval),
        ("--unwatched-telemetry-interval", args.unwatched_telemetry_interval),
    ):
        if not 0.01 <= seconds <= 86400:
            print(f"vramchatd: {flag} must be between 0.01 and 86400 seconds, not {seconds}", file=sys.stderr)
            return 2
    if args.insecure_tcp and not (args.tcp or config.tcp_listen):
        print("vramchatd: --insecure-tcp needs --tcp HOST:PORT (or tcp_listen in the config)", file=sys.stderr)
        return 2
    if args.keep_alive is not None:
        try:
            config.keep_alive_s = parse_duration(args.keep_alive)
        except ValueError as exc:
            print(f"vramchatd: --keep-alive: {exc}", file=sys.stderr)
            return 2
    config.model_dirs += [Path(d).expanduser() for d in args.models_dir]
    try:
        for server in args.rpc:
            parse_endpoint(server)
    except EndpointError as exc:
        print(f"vramchatd: --rpc: {exc}", file=sys.stderr)
        return 2
    config.rpc_servers = list(dict.fromkeys([*config.rpc_servers, *args.rpc]))
    for name, value in (("n_gpu_layers", args.gpu_layers), ("n_ctx", args.ctx), ("n_threads", args.threads)):
        if value is not None:
            setattr(config, name, value)
    settings = DaemonSettings(
        runtime_dir=paths.runtime_dir(args.runtime_dir),
        data_dir=paths.data_dir(args.data_dir),
        config=config,
        startup_model=args.model,
        load_on_start=not args.no_load,
        socket_dir_mode=0o750 if args.socket_mode == "group" else 0o700,
        tcp_listen=args.tcp or config.tcp_listen,
        http_listen=args.http or config.http_listen,
        insecure_tcp=args.insecure_tcp,
        telemetry_interval_s=args.telemetry_interval,
        unwatched_telemetry_interval_s=args.unwatched_telemetry_interval,
    )
    scheduling.use_short_slice()  # before any thread starts: they inherit it
    try:
        store = Store(settings.data_dir / "conversations.sqlite3")
        return asyncio.run(Daemon(settings, store).run())
    except (StoreError, UnsafeDirectoryError) as exc:
        print(f"vramchatd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
