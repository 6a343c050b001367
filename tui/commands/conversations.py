"""`vramchat conversations [ID]`: list the stored conversations, or print one."""

from __future__ import annotations

import argparse
import time

from vramchat.tui.commands.common import open_client, print_json
from vramchat.tui.state import view_marker, view_start


def register(commands: argparse._SubParsersAction) -> None:
    conversations = commands.add_parser("conversations", help="list conversations, or print one")
    conversations.add_argument("id", nargs="?", help="print this conversation's messages")
    conversations.add_argument("--json", action="store_true")
    conversations.set_defaults(handler=cmd_conversations)


async def cmd_conversations(args: argparse.Namespace) -> int:
    async with open_client(args, "conversations") as client:
        if args.id:
            data = await client.request("conversation.get", {"id": args.id})
        else:
            data = await client.request("conversation.list")
    if args.json:
        print_json(data)
    elif args.id:
        print(f"# {data['conversation']['title']}  ({data['conversation']['id']})")
        view = view_start(data["messages"])
        for message in data["messages"]:
            if view and message["id"] == view["first_message"]:
                print(f"\n--- {view_marker(view['dropped'])} ---")
            flag = "" if message["status"] == "complete" else f"  [{message['status']}]"
            print(f"\n{message['role']}:{flag}\n{message['content']}")
    else:
        for conversation in data["conversations"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation["updated_at"]))
            print(f"{conversation['id']}  {when}  {conversation['message_count']:>4} msgs  {conversation['title']}")
    return 0
