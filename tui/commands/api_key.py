"""`vramchat api-key`: the bearer key of the daemon's HTTP API, made on first use."""

from __future__ import annotations

import argparse
import sys

from vramchat.shared import api_key, paths


def register(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "api-key",
        help="print the HTTP API's key (Authorization: Bearer KEY), creating it on first use",
        description="Print the key that the daemon's OpenAI-compatible API (vramchatd --http) requires.",
    )
    command.add_argument("--data-dir", help="the daemon's data dir (env VRAMCHAT_DATA_DIR; default the XDG data dir)")
    command.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    data_dir = paths.data_dir(args.data_dir)
    try:
        print(api_key.read_or_create(data_dir))
    except (api_key.ApiKeyError, OSError) as exc:
        print(f"vramchat api-key: {exc}", file=sys.stderr)
        return 1
    return 0
