"""Getting a model from the Hugging Face Hub in the TUI (the models screen's `g`).

A repo's quantizations are planned for the daemon's machine from their GGUF headers alone (HTTP
Range reads, shared/hub.py), as `vramchat pull REPO --list` plans them. The one picked is
downloaded by the daemon, so closing the TUI does not stop it and every attached TUI sees its
progress; once it is complete, the dialog returns the model for the load dialog.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, ProgressBar

from vramchat.shared.client import RequestFailed
from vramchat.shared.config import ConfigError, load_config
from vramchat.shared.load_options import settings_from
from vramchat.shared.load_plan import Machine
from vramchat.shared.planner import PlanError
from vramchat.shared.units import format_bytes
from vramchat.tui.widgets import StateChanged, vramchat_app

# The quant table's columns: (title, width); the plan's `where` takes what the dialog has left.
COLUMNS = (("quant", 12), ("size", 11), ("swap", 4), ("tok/s", 6))


class HubDialog(ModalScreen[dict[str, Any] | None]):
    """Repo, then its planned quants, then the download; returns {"name", "path"} of the model."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self) -> None:
        super().__init__()
        self.result: dict[str, Any] | None = None  # plan_repo's answer for the repo listed
        self.download_id: str | None = None
        self.progress_seen: list[float] = []  # what the progress bar was set to, in order

    def compose(self) -> ComposeResult:
        with Vertical(id="hub-dialog", classes="dialog"):
            yield Label("Get a model from the Hugging Face Hub", classes="dialog-title")
            yield Input(placeholder="a GGUF repo, ORG/NAME, then Enter", id="repo", compact=True)
            yield Label("", id="hub-status")
            yield DataTable(id="quants", cursor_type="row", zebra_stripes=True)
            yield ProgressBar(show_eta=False, id="download")
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close", compact=True)

    def on_mount(self) -> None:
        self.query_one("#quants").display = False
        self.query_one("#download").display = False
        self.query_one("#repo", Input).focus()

    def say(self, text: str) -> None:
        self.query_one("#hub-status", Label).update(text)

    @on(Input.Submitted, "#repo")
    def list_repo(self, event: Input.Submitted) -> None:
        repo = event.value.strip()
        if repo:
            self.say(f"reading the headers of {repo}'s quantizations…")
            self.plan(repo)

    @work(thread=True, exclusive=True, exit_on_error=False, group="hub")
    def plan(self, repo: str) -> None:
        """Listing and planning are network round trips: off the UI thread."""
        from vramchat.shared import hub  # huggingface_hub is slow to import: only when the Hub is asked

        host = Machine.from_sample(vramchat_app(self).state.latest_sample())  # the daemon's machine
        try:
            config = load_config()
            settings = settings_from({}, config.load_defaults(), config.n_ctx)
            # The environment now, not at huggingface_hub's import: a test, or a user, may set them later.
            endpoint, token = os.environ.get("HF_ENDPOINT"), os.environ.get("HF_TOKEN")
            listing = hub.list_quants(repo, endpoint=endpoint, token=token)
            result = hub.plan_repo(listing, host, settings, endpoint=endpoint, token=token)
        except (hub.HubError, PlanError, ConfigError) as exc:
            self.app.call_from_thread(self.say, f"[b red]{exc}[/]")
            return
        self.app.call_from_thread(self.show_quants, result)

    def show_quants(self, result: dict[str, Any]) -> None:
        self.result = result
        table = self.query_one("#quants", DataTable)
        table.clear(columns=True)
        where_width = max(10, table.size.width - sum(w + 2 for _, w in COLUMNS) - 6)
        for title, width in (*COLUMNS[:2], ("where", where_width), *COLUMNS[2:]):
            table.add_column(title, width=width, key=title)
        for quant in result["quants"]:
            mark = "* " if quant["quant"] == result["recommended"] else "  "
            if quant.get("error"):
                cells = [format_bytes(quant["size_bytes"]), f"not planned: {quant['error']}", "", ""]
            else:
                swap = "YES" if quant["would_swap"] else "no"
                cells = [format_bytes(quant["size_bytes"]), quant["where"], swap, f"{quant['tokens_per_s'] or 0:.1f}"]
            template = "" if quant["chat_template"] is not False else " !"
            table.add_row(mark + quant["quant"] + template, *cells, key=quant["quant"])
        table.display = True
        names = [q["quant"] for q in result["quants"]]
        if result["recommended"] in names:
            table.move_cursor(row=names.index(result["recommended"]))
        table.focus()
        why = f"* recommended: {result['why']}" if result["recommended"] else f"no recommendation: {result['why']}"
        self.say(why + "  Enter downloads the quant under the cursor; ! marks a base model without a chat template.")

    @on(DataTable.RowSelected, "#quants")
    def choose(self, event: DataTable.RowSelected) -> None:
        if self.result is not None and self.download_id is None and event.row_key.value:
            self.pull(str(event.row_key.value))

    @work(exclusive=True, exit_on_error=False, group="pull")
    async def pull(self, quant: str) -> None:
        assert self.result is not None
        body = {"repo": self.result["repo"], "quant": quant, "revision": self.result["revision"]}
        try:
            reply = await vramchat_app(self).client.request("pull", body, request_id=uuid.uuid4().hex)
        except (TimeoutError, RequestFailed) as exc:
            self.say(f"[b red]{exc.message if isinstance(exc, RequestFailed) else 'the daemon did not answer'}[/]")
            return
        self.download_id = reply["download"]["id"]
        self.query_one("#download").display = True
        self.follow(reply["download"])

    def on_state_changed(self, _: StateChanged) -> None:
        """The download's progress comes from the daemon's `download` events."""
        if self.download_id is not None and (download := vramchat_app(self).state.downloads.get(self.download_id)):
            self.follow(download)

    def follow(self, download: dict[str, Any]) -> None:
        bar = self.query_one("#download", ProgressBar)
        bar.update(total=max(1, download["total_bytes"]), progress=download["done_bytes"])
        if not self.progress_seen or self.progress_seen[-1] != bar.progress:
            self.progress_seen.append(bar.progress)
        state, name = download["state"], f"{download['repo']}:{download['quant']}"
        if state == "complete" and download.get("model_path"):
            self.dismiss({"name": name, "path": download["model_path"]})
        elif state in ("error", "cancelled"):
            self.say(f"[b red]{name}: {download.get('error') or state}[/]")
            self.download_id = None
        else:
            rate, eta = download.get("rate_bps"), download.get("eta_s")
            speed = f", {format_bytes(int(rate))}/s" if rate else ""
            left = f", {eta:.0f} s left" if eta is not None else ""
            self.say(
                f"{state} {name}: {format_bytes(download['done_bytes'])} of {format_bytes(download['total_bytes'])}"
                f"{speed}{left}. The daemon downloads it: closing this dialog or the TUI does not stop it."
            )

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)
