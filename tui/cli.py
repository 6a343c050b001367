"""`vramchat`: the TUI (no subcommand) and the plain-terminal subcommands.

Every subcommand talks to the daemon through vramchat.shared.client, prints data as JSON with
--json, and exits non-zero with a one-line message when the daemon is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
import uuid
from typing import Any, Awaitable, Callable

from vramchat.shared.client import Client, DaemonNotRunning, RequestFailed, Snapshot
from vramchat.shared.units import format_bytes
from vramchat.tui import plan_cmd, service_cmd
from vramchat.tui.telemetry_view import format_split, format_status, format_top

Handler = Callable[[argparse.Namespace], Awaitable[int]]


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
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    ask = commands.add_parser("ask", help="ask a question and stream the reply to stdout")
    ask.add_argument("prompt", nargs="?", help="the question (read from stdin when absent)")
    where = ask.add_mutually_exclusive_group()
    where.add_argument("--conversation", metavar="ID", help="continue this conversation (an id prefix is enough)")
    where.add_argument("-c", "--continue", dest="continue_last", action="store_true", help="continue the most recent conversation")
    where.add_argument("--new", action="store_true", help="start a new conversation (the default)")
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--top-p", type=float)
    ask.add_argument("--top-k", type=int)
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--json", action="store_true", help="print the stored reply as JSON instead of streaming text")
    ask.set_defaults(handler=cmd_ask)

    status = commands.add_parser("status", help="the daemon, the model and the memory now")
    status.add_argument("--json", action="store_true", help="raw numbers, in bytes")
    status.set_defaults(handler=cmd_status)

    top = commands.add_parser("top", help="a live memory view in the plain terminal (q or Ctrl-C quits)")
    top.set_defaults(handler=cmd_top)

    models = commands.add_parser("models", help="the models the daemon can load")
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=cmd_models)

    load = commands.add_parser("load", help="load a model (by name from `vramchat models`, or a path)")
    load.add_argument("model")
    load.add_argument("--gpu-layers", type=_gpu_layers, help='layers to put in VRAM (0 .. the model\'s layers + 1), or "auto" to fit --vram-budget')
    load.add_argument("--vram-budget", help="with --gpu-layers auto: VRAM to fill, e.g. 11.5GiB (default: free VRAM - 1 GiB)")
    load.add_argument("--force", action="store_true", help="load even if the planner predicts the system would swap")
    load.add_argument("--ctx", type=int, help="context window in tokens")
    load.add_argument("--threads", type=int, help="CPU threads")
    load.add_argument("--json", action="store_true")
    load.set_defaults(handler=cmd_load)

    conversations = commands.add_parser("conversations", help="list conversations, or print one")
    conversations.add_argument("id", nargs="?", help="print this conversation's messages")
    conversations.add_argument("--json", action="store_true")
    conversations.set_defaults(handler=cmd_conversations)

    chat = commands.add_parser("chat", help="a line-by-line chat in the terminal")
    chat.set_defaults(handler=run_interactive)

    plan_cmd.register(commands)
    service_cmd.register(commands)
    return parser


def _client(args: argparse.Namespace, name: str) -> Client:
    return Client(args.runtime_dir, name=f"vramchat {name}")


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- ask ----------------------------------------------------------------------------------------


async def cmd_ask(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print("vramchat: the prompt is empty; give one as an argument or on stdin", file=sys.stderr)
        return 2
    sampling = {
        name: value
        for name, value in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k),
                            ("max_tokens", args.max_tokens), ("seed", args.seed))
        if value is not None
    }
    async with _client(args, "ask") as client:
        conversation = args.conversation
        if args.continue_last:
            listed = (await client.request("conversation.list"))["conversations"]
            conversation = listed[0]["id"] if listed else None
        reply = await stream_reply(client, prompt, conversation, sampling, echo=not args.json)
    if args.json:
        _print_json(reply)
    return 0 if reply["status"] == "complete" else 1


async def stream_reply(client: Client, prompt: str, conversation: str | None, sampling: dict[str, Any], *, echo: bool) -> dict[str, Any]:
    """Send a chat request and print its tokens as they arrive; returns the stored reply."""
    await client.subscribe()
    events = client.raw_events()
    request_id = uuid.uuid4().hex
    body: dict[str, Any] = {"content": prompt, "sampling": sampling}
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
        print(f"[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, "
              f"first token after {stats['ttft_s'] * 1000:.0f} ms]", file=sys.stderr)


# --- status, models, load, conversations ---------------------------------------------------


async def cmd_status(args: argparse.Namespace) -> int:
    async with _client(args, "status") as client:
        status = await client.request("status")
    if args.json:
        _print_json(status)
        return 0
    daemon, model, queue = status["daemon"], status["model"], status["queue"]
    print(f"vramchatd {daemon['version']}  pid {daemon['pid']}  up {daemon['uptime_s']:.0f} s  "
          f"{daemon['clients']} client(s) attached")
    print(describe_model(model))
    if model.get("state") == "ready":
        print(format_plan_against_split(model))
    print(f"queue: {'1 running' if queue['running'] else 'idle'}, {len(queue['pending'])} waiting")
    print(format_status(status["telemetry"], status["alarms"]))
    return 0


async def cmd_top(args: argparse.Namespace) -> int:
    """Redraws in place on every telemetry event, from a snapshot's history on."""
    async with _client(args, "top") as client:
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
                del history[:-1200]
                width = shutil.get_terminal_size().columns
                sys.stdout.write("\x1b[H\x1b[2J" + format_top(item.body, history, model, width) + "\n")
                sys.stdout.flush()
    return 0


def describe_model(model: dict[str, Any]) -> str:
    state = model.get("state", "idle")
    name = model.get("name") or "no model"
    if state == "ready":
        return (f"model: {name}  ({model['n_gpu_layers']} GPU layers, n_ctx {model['n_ctx']}, "
                f"{model['n_threads']} threads, loaded in {model['load_seconds']:.2f} s)")
    if state == "loading":
        progress = model.get("progress")
        return f"model: loading {name}" + (f" ({progress * 100:.0f}%)" if progress is not None else "")
    if state in ("error", "crashed"):
        return f"model: {state}: {model.get('error')}"
    return "model: none loaded (vramchat load MODEL)"


async def cmd_models(args: argparse.Namespace) -> int:
    async with _client(args, "models") as client:
        listed = await client.request("models")
    if args.json:
        _print_json(listed)
        return 0
    for model in listed["models"]:
        mark = "*" if model["loaded"] else " "
        print(f"{mark} {model['name']:<48} {format_bytes(model['size_bytes']):>12}  {model['source']}")
    if not listed["models"]:
        print("no models found; add a directory with `vramchatd --models-dir DIR` or model_dirs in the config")
    return 0


async def cmd_load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "force": args.force}
    for name, value in (("n_gpu_layers", args.gpu_layers), ("n_ctx", args.ctx), ("n_threads", args.threads),
                        ("vram_budget", args.vram_budget)):
        if value is not None:
            body[name] = value
    async with _client(args, "load") as client:
        await client.subscribe()
        progress = asyncio.create_task(_show_load_progress(client))
        try:
            result = await client.request("load", body, timeout=None)
        finally:
            progress.cancel()
    if args.json:
        _print_json(result)
    else:
        model = result["model"]
        print(describe_model(model))
        print(format_plan_against_split(model))
    return 0


def _gpu_layers(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def format_plan_against_split(model: dict[str, Any]) -> str:
    """The planner's prediction next to what llama.cpp allocated."""
    plan, split = model.get("plan") or {}, model.get("split") or {}
    prediction = plan.get("prediction")
    if not prediction:
        return format_split(split, model.get("n_gpu_layers"))
    speed = f", expected up to {prediction['tokens_per_s']:.0f} tok/s" if prediction.get("tokens_per_s") else ""
    return (f"predicted: VRAM {format_bytes(prediction['gpu']['total'])}, RAM {format_bytes(prediction['cpu']['total'])}{speed}\n"
            f"allocated by llama.cpp: GPU {format_bytes(split.get('gpu_bytes'))}, CPU {format_bytes(split.get('cpu_bytes'))}")


async def _show_load_progress(client: Client) -> None:
    """A one-line progress bar on stderr from the daemon's `model` events."""
    async for event in client.raw_events():
        if event.topic == "model" and event.body.get("state") == "loading" and event.body.get("progress") is not None:
            done = int(event.body["progress"] * 30)
            print(f"\rloading [{'#' * done}{'.' * (30 - done)}] {event.body['progress'] * 100:3.0f}%", end="", file=sys.stderr, flush=True)
            if event.body["progress"] >= 1.0:
                print(file=sys.stderr)


async def cmd_conversations(args: argparse.Namespace) -> int:
    async with _client(args, "conversations") as client:
        if args.id:
            data = await client.request("conversation.get", {"id": args.id})
        else:
            data = await client.request("conversation.list")
    if args.json:
        _print_json(data)
    elif args.id:
        print(f"# {data['conversation']['title']}  ({data['conversation']['id']})")
        for message in data["messages"]:
            flag = "" if message["status"] == "complete" else f"  [{message['status']}]"
            print(f"\n{message['role']}:{flag}\n{message['content']}")
    else:
        for conversation in data["conversations"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation["updated_at"]))
            print(f"{conversation['id']}  {when}  {conversation['message_count']:>4} msgs  {conversation['title']}")
    return 0


# --- interactive ----------------------------------------------------------------------------


def open_tui(args: argparse.Namespace) -> int:
    """The Textual app in a terminal; the line-by-line chat when there is no terminal."""
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        return run_interactive(args)
    from vramchat.tui.app import run_app  # Textual is slow to import: only when the TUI opens

    return run_app(args.runtime_dir)


async def run_interactive(args: argparse.Namespace) -> int:
    """A line-by-line chat: each line is a message in one conversation. /new starts another."""
    async with _client(args, "chat") as client:
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


if __name__ == "__main__":
    sys.exit(main())
