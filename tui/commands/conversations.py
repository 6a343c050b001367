"""`vramchat conversations [ID]`: list the stored conversations, print one (as text, JSON or
Markdown), or search every message of every conversation."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from vramchat.shared.markdown_export import conversation_markdown
from vramchat.tui.commands.common import open_client, print_json
from vramchat.tui.state import view_marker, view_start

SEARCH_LIMIT = 200  # the most the daemon returns


def register(commands: argparse._SubParsersAction) -> None:
    conversations = commands.add_parser("conversations", help="list conversations, print one, or search them all")
    conversations.add_argument("id", nargs="?", help="print this conversation's messages (its current version)")
    conversations.add_argument("--json", action="store_true")
    conversations.add_argument("--markdown", action="store_true", help="print the conversation ID as a Markdown document")
    conversations.add_argument(
        "--search", metavar="TEXT", help="find messages that contain these words (earlier versions too), newest first"
    )
    conversations.set_defaults(handler=cmd_conversations)


async def cmd_conversations(args: argparse.Namespace) -> int:
    if args.markdown and (not args.id or args.json):
        print("vramchat conversations: --markdown prints one conversation: give its ID, and no --json", file=sys.stderr)
        return 2
    if args.search is not None and args.id:
        print("vramchat conversations: --search looks in every conversation: give no ID", file=sys.stderr)
        return 2
    async with open_client(args, "conversations") as client:
        if args.search is not None:
            data = await client.request("conversation.search", {"text": args.search, "limit": SEARCH_LIMIT})
        elif args.id:
            data = await client.request("conversation.get", {"id": args.id})
        else:
            data = await client.request("conversation.list")
    if args.json:
        print_json(data)
    elif args.search is not None:
        print_results(data["results"])
    elif args.markdown:
        sys.stdout.write(conversation_markdown(data["conversation"], data["messages"]))
    elif args.id:
        print_conversation(data)
    else:
        for conversation in data["conversations"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation["updated_at"]))
            print(f"{conversation['id']}  {when}  {conversation['message_count']:>4} msgs  {conversation['title']}")
    return 0


def print_conversation(data: dict[str, Any]) -> None:
    print(f"# {data['conversation']['title']}  ({data['conversation']['id']})")
    view = view_start(data["messages"])
    for message in data["messages"]:
        if view and message["id"] == view["first_message"]:
            print(f"\n--- {view_marker(view['dropped'])} ---")
        flag = "" if message["status"] == "complete" else f"  [{message['status']}]"
        print(f"\n{message['role']}:{flag}\n{message['content']}")


def print_results(results: list[dict[str, Any]]) -> None:
    """Two lines a match: the conversation, its title, the role (and whether the message is in an
    earlier version, which `conversation.switch` brings back); then the matching line."""
    if not results:
        print("nothing found")
        return
    for result in results:
        earlier = "  [earlier version]" if not result["current"] else ""
        print(f"{result['conversation']}  {result['title']}  {result['role']}{earlier}")
        print(f"    {result['line']}")
