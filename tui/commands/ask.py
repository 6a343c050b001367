"""`vramchat ask` and `vramchat chat`: send prompts and stream the replies to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from vramchat.shared import scheduling
from vramchat.shared.client import Client
from vramchat.tui.commands.common import describe_model, open_client, print_json


def register(commands: argparse._SubParsersAction) -> None:
    ask = commands.add_parser("ask", help="ask a question and stream the reply to stdout")
    ask.add_argument("prompt", nargs="?", help="the question (read from stdin when absent)")
    where = ask.add_mutually_exclusive_group()
    where.add_argument("--conversation", metavar="ID", help="continue this conversation (an id prefix is enough)")
    where.add_argument(
        "-c", "--continue", dest="continue_last", action="store_true", help="continue the most recent conversation"
    )
    where.add_argument("--new", action="store_true", help="start a new conversation (the default)")
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--top-p", type=float)
    ask.add_argument("--top-k", type=int)
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--json", action="store_true", help="print the stored reply as JSON instead of streaming text")
    ask.add_argument(
        "--json-schema",
        metavar="FILE",
        type=Path,
        help="make the reply JSON that validates against the JSON schema in FILE (a schema, or OpenAI's {name, schema, strict})",
    )
    ask.set_defaults(handler=cmd_ask)

    chat = commands.add_parser("chat", help="a line-by-line chat in the terminal")
    chat.set_defaults(handler=run_interactive)


async def cmd_ask(args: argparse.Namespace) -> int:
    scheduling.use_short_slice()  # it wakes for every frame of the reply's tokens
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print("vramchat: the prompt is empty; give one as an argument or on stdin", file=sys.stderr)
        return 2
    sampling = {
        name: value
        for name, value in (
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("top_k", args.top_k),
            ("max_tokens", args.max_tokens),
            ("seed", args.seed),
        )
        if value is not None
    }
    try:
        schema = read_json_schema(args.json_schema) if args.json_schema else None
    except ValueError as exc:
        print(f"vramchat: {exc}", file=sys.stderr)
        return 2
    async with open_client(args, "ask") as client:
        conversation = args.conversation
        if args.continue_last:
            listed = (await client.request("conversation.list"))["conversations"]
            conversation = listed[0]["id"] if listed else None
        reply = await stream_reply(client, prompt, conversation, sampling, echo=not args.json, json_schema=schema)
    if args.json:
        print_json(reply)
    return 0 if reply["status"] == "complete" else 1


def read_json_schema(path: Path) -> dict[str, Any]:
    """The `chat` request's json_schema from FILE: a bare schema (properties may be optional), or
    OpenAI's response_format.json_schema object with its own `strict`."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the JSON schema in {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a JSON schema object")
    if isinstance(loaded.get("schema"), dict) and "name" in loaded:
        return {"schema": loaded["schema"], "strict": bool(loaded.get("strict", False))}
    return {"schema": loaded, "strict": False}


async def stream_reply(
    client: Client,
    prompt: str,
    conversation: str | None,
    sampling: dict[str, Any],
    *,
    echo: bool,
    json_schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send a chat request and print its tokens as they arrive; returns the stored reply."""
    await client.subscribe()
    events = client.raw_events()
    request_id = uuid.uuid4().hex
    body: dict[str, Any] = {"content": prompt, "sampling": sampling}
    if json_schema is not None:
        body["json_schema"] = json_schema
    if conversation:
        body["conversation"] = conversation
    accepted = await client.request("chat", body, request_id=request_id)
    if accepted["position"] > 1 and sys.stderr.isatty():
        print(f"[queued: {accepted['position'] - 1} request(s) ahead]", file=sys.stderr)
    try:
        async for event in events:
            if event.topic == "tok" and event.body.get("request") == request_id and echo:
                sys.stdout.write(event.body["text"])
                sys.stdout.flush()
            elif event.topic == "msg" and event.body.get("request") == request_id and event.body.get("status") != "generating":
                if echo:
                    _print_ending(event.body)
                return event.body
    except asyncio.CancelledError:
        await client.request("cancel", {"request": request_id})
        raise
    raise RuntimeError("the event stream ended")  # raw_events never ends


def _print_ending(message: dict[str, Any]) -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()
    stats = message.get("stats") or {}
    if message["status"] != "complete":
        print(f"[{message['status']}: {message.get('error') or 'no reason given'}]", file=sys.stderr)
    elif sys.stderr.isatty() and stats.get("tokens_per_s"):
        print(
            f"[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, "
            f"first token after {stats['ttft_s'] * 1000:.0f} ms]",
            file=sys.stderr,
        )


async def run_interactive(args: argparse.Namespace) -> int:
    """A line-by-line chat: each line is a message in one conversation. /new starts another."""
    scheduling.use_short_slice()  # it wakes for every frame of a reply's tokens
    async with open_client(args, "chat") as client:
        status = await client.request("status")
        print(describe_model(status["model"]))
        print("Type a message and press Enter. /new starts a new conversation, /quit or Ctrl-D leaves.")
        conversation: str | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await loop.run_in_executor(None, input, "> ")
            except EOFError:
                print()
                return 0
            if line.strip() in ("/quit", "/exit"):
                return 0
            if line.strip() == "/new":
                conversation = None
                continue
            if not line.strip():
                continue
            reply = await stream_reply(client, line, conversation, {}, echo=True)
            conversation = reply["conversation_id"]
