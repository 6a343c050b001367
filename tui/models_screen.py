"""The models screen and the load dialog, with the planner's prediction before anything loads.

The planner reads the GGUF header here, in the TUI, so the prediction follows every keystroke
without a round trip; the daemon plans again when it loads (and refuses a load that would swap).
A model the daemon names by a path this machine cannot read is listed without a plan.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Literal

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, DataTable, Footer, Header, Input, Label, ProgressBar, Static

from vramchat.shared import speed
from vramchat.shared.client import RequestFailed
from vramchat.shared.gguf import GGUFError, GGUFInfo, inspect_cached, quant_name
from vramchat.shared.load_options import parse_flags, settings_from
from vramchat.shared.load_plan import LoadPlan, Machine, plan_load
from vramchat.shared.planner import PlanError
from vramchat.shared.units import format_bytes, format_count
from vramchat.tui import model_table
from vramchat.tui.hub_dialog import HubDialog
from vramchat.tui.state import ChatState
from vramchat.tui.telemetry_view import NO_GPU
from vramchat.tui.widgets import MemoryBar, StateChanged, vramchat_app


def machine(state: ChatState) -> Machine:
    """This machine as the daemon's latest telemetry sample describes it."""
    return Machine.from_sample(state.latest_sample())


def describe_prediction(plan: LoadPlan, cpu_only: LoadPlan | None = None) -> str:
    """Four lines a person can act on: the layers, VRAM against the budget, RAM against what is
    available, speed. On a machine without a GPU, `cpu_only` is the same load at 0 GPU layers,
    which is what llama.cpp does there whatever the count: its RAM and speed are shown, with NO_GPU
    in place of the VRAM line."""
    row, budget = plan.prediction, plan.budget
    actual = cpu_only or plan
    gpu, cpu = row.gpu, actual.prediction.cpu
    fits = "fits" if gpu.total <= budget else f"[b red]over by {format_bytes(gpu.total - budget)}[/]"
    vram = (
        f"[b]{NO_GPU}[/]"
        if cpu_only
        else f"VRAM {format_bytes(gpu.total)} (weights {format_bytes(gpu.weights)}, KV {format_bytes(gpu.kv)}, "
        f"compute {format_bytes(gpu.compute)}); budget {format_bytes(budget)}: {fits}"
    )
    return "\n".join(
        [
            f"{row.n_gpu_layers} GPU layers: {row.layers_on_gpu} of {row.n_layer} layers"
            f"{' + output' if row.output_on_gpu else ''}, n_ctx {row.n_ctx}",
            vram,
            f"RAM  {format_bytes(cpu.total)} (weights {format_bytes(cpu.weights)}, KV {format_bytes(cpu.kv)}); "
            f"{format_bytes(actual.machine.available_ram)} available: "
            + ("[b red]would swap[/]" if actual.swap.would_swap else "fits"),
            # The formula's figures: the daemon sizes the buffers with llama.cpp's dry run before it loads.
            f"speed about {actual.prediction.tokens_per_s or 0:.1f} tok/s; llama.cpp checks these figures on Load",
        ]
    )


class LayerStepper(Static, can_focus=True):
    """n_gpu_layers: a number, or "auto" to fit the VRAM budget."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left,minus", "step(-1)", "-1 layer"),
        Binding("right,plus,equals_sign", "step(1)", "+1 layer"),
        Binding("a", "auto", "auto"),
    ]
    value: reactive[int | str] = reactive[int | str]("auto")

    def __init__(self, value: int | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.maximum: int | None = None
        self.set_reactive(LayerStepper.value, value)
        self.fitted: int | None = None  # what "auto" resolves to, for stepping from it

    class Changed(Message):
        pass

    def render(self) -> str:
        top = f"0..{self.maximum}" if self.maximum is not None else "0.."
        shown = f"auto ({self.fitted})" if self.value == "auto" and self.fitted is not None else str(self.value)
        return f"GPU layers  ◀ {shown} ▶   {top}  (←/→ step, a: auto)"

    def set_maximum(self, maximum: int) -> None:
        """The model's layer count + the output layer; a value above it comes down to it."""
        self.maximum = maximum
        self.value = self.value

    def validate_value(self, value: int | str) -> int | str:
        if isinstance(value, int):
            return max(0, value if self.maximum is None else min(self.maximum, value))
        return value

    def action_step(self, delta: int) -> None:
        start = self.fitted if self.value == "auto" else self.value
        if isinstance(start, int):
            self.value = start + delta

    def action_auto(self) -> None:
        self.value = "auto"

    def watch_value(self) -> None:
        self.post_message(self.Changed())


class LoadDialog(ModalScreen[dict[str, Any] | None]):
    """Choose n_gpu_layers, n_ctx and a VRAM budget, see the prediction, then load; returns the loaded model."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close"), Binding("enter", "load", "Load")]

    def __init__(
        self, model: dict[str, Any], n_gpu_layers: int | str = "auto", n_ctx: int = 4096, title: str | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.initial_layers = n_gpu_layers
        self.initial_ctx = n_ctx
        self.heading = title or f"Load {model['name']}"
        self.info: GGUFInfo | None = None
        self.progress_seen: list[float] = []  # what the progress bar was set to, in order

    def compose(self) -> ComposeResult:
        with Vertical(id="load-dialog", classes="dialog"):
            yield Label(self.heading, classes="dialog-title")
            yield Label("reading the model…", id="model-info")
            yield LayerStepper(self.initial_layers, id="layers")
            with Horizontal(classes="field"):
                yield Label("n_ctx", classes="field-label")
                yield Input(str(self.initial_ctx), id="n-ctx", type="integer", compact=True)
            with Horizontal(classes="field", id="budget-field"):
                yield Label("VRAM budget", classes="field-label")
                yield Input(placeholder="free VRAM - 1 GiB; per device: RPC0=2GiB,CUDA0=10GiB", id="budget", compact=True)
            with Horizontal(classes="field"):
                yield Label("options", classes="field-label")
                yield Input(placeholder="llama.cpp flags, e.g. -ctk q8_0 -fa on --tensor-split 3,1", id="options", compact=True)
            yield Static("", id="prediction")
            yield Checkbox("load even if it would swap", id="force", compact=True)
            yield ProgressBar(total=1.0, show_eta=False, id="progress")
            yield Label("", id="load-error")
            with Horizontal(classes="buttons"):  # compact: all of it, progress and error included, fits 80x24
                yield Button("Load", variant="primary", id="load", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#progress").display = False
        self.query_one("#load-error").display = False
        self.query_one("#budget-field").display = machine(vramchat_app(self).state).has_gpu  # no VRAM to budget
        self.query_one(LayerStepper).focus()
        self.inspect()

    @work(thread=True, exclusive=True, exit_on_error=False, group="inspect")
    def inspect(self) -> None:
        """Reading a GGUF header parses its whole vocabulary: seconds for a big model."""
        try:
            info = inspect_cached(self.model["path"])
            speed.ram_bandwidth()  # measured once per machine and cached
        except (GGUFError, OSError) as exc:
            self.app.call_from_thread(self.query_one("#model-info", Label).update, f"no plan: {exc}")
            return
        self.app.call_from_thread(self.show_info, info)

    def show_info(self, info: GGUFInfo) -> None:
        self.info = info
        self.query_one(LayerStepper).set_maximum(info.n_layer + 1)
        self.query_one("#model-info", Label).update(
            f"{info.architecture}, {format_count(info.parameters)} parameters, {quant_name(info.file_type)}, "
            f"{format_bytes(info.file_size)}{f' in {info.shards} files' if info.shards > 1 else ''}, "
            f"{info.n_layer} layers + output, trained ctx {info.n_ctx_train}"
        )
        self.update_prediction()

    @on(LayerStepper.Changed)
    @on(Input.Changed)
    def update_prediction(self) -> None:
        stepper = self.query_one(LayerStepper)
        if self.info is None:
            stepper.refresh()
            return
        try:
            options = parse_flags(self.query_one("#options", Input).value)
            settings = settings_from(options, {}, int(self.query_one("#n-ctx", Input).value or 0))
            budget = self.query_one("#budget", Input).value.strip() or None
            layers: int | Literal["auto"] = "auto" if stepper.value == "auto" else int(stepper.value)
            host = machine(vramchat_app(self).state)
            plan = plan_load(self.info, host, layers, settings, vram_budget=budget)
            stepper.fitted = plan.fitted.n_gpu_layers
            cpu_only = None if host.has_gpu else plan_load(self.info, host, 0, settings)
            text = describe_prediction(plan, cpu_only)
        except (PlanError, ValueError) as exc:
            text = f"[b red]{exc}[/]"
        stepper.refresh()
        self.query_one("#prediction", Static).update(text)

    @on(Input.Submitted)
    @on(Button.Pressed, "#load")
    def action_load(self) -> None:
        if self.query_one("#load", Button).disabled:
            return  # already loading
        self.query_one("#load-error", Label).display = False
        self.query_one("#progress").display = True
        self.query_one("#load", Button).disabled = True
        self.load()

    @work(exclusive=True, exit_on_error=False, group="load")
    async def load(self) -> None:
        stepper = self.query_one(LayerStepper)
        body: dict[str, Any] = {
            "model": self.model["path"],
            "n_gpu_layers": stepper.value,
            "n_ctx": int(self.query_one("#n-ctx", Input).value or 0),
            "force": self.query_one("#force", Checkbox).value,
        }
        try:
            body.update(parse_flags(self.query_one("#options", Input).value))
            if budget := self.query_one("#budget", Input).value.strip():
                body["vram_budget"] = budget
        except (PlanError, ValueError) as exc:
            self.show_load_error(str(exc))
            return
        try:
            reply = await vramchat_app(self).client.request("load", body, timeout=None, request_id=uuid.uuid4().hex)
        except (TimeoutError, RequestFailed) as exc:
            self.show_load_error(exc.message if isinstance(exc, RequestFailed) else "the daemon did not answer")
            return
        self.dismiss(reply["model"])

    def show_load_error(self, text: str) -> None:
        error = self.query_one("#load-error", Label)
        error.update(text)
        error.display = True
        self.query_one("#progress").display = False
        self.query_one("#load", Button).disabled = False

    def on_state_changed(self, _: StateChanged) -> None:
        """Loading progress comes from the daemon's `model` events."""
        model = vramchat_app(self).state.model
        if model.get("state") == "loading" and model.get("path") == self.model["path"] and model.get("progress") is not None:
            bar = self.query_one("#progress", ProgressBar)
            bar.update(progress=model["progress"])
            self.progress_seen.append(bar.progress)

    @on(Button.Pressed, "#cancel")
    def action_close(self) -> None:
        self.dismiss(None)


class ModelsScreen(Screen[None]):
    """The daemon's models with their metadata and whether each fits; Enter opens the load dialog."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back to chat"),
        Binding("g", "get_from_hub", "Get from the Hub"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield MemoryBar(classes="memory-bar")
        yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
        yield Label("Enter: plan and load the model under the cursor; g: get one from the Hub", id="models-hint")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.models: list[dict[str, Any]] = []
        self.rows: list[dict[str, str]] = []
        self.list_models()

    @work(exclusive=True, exit_on_error=False, group="models")
    async def list_models(self) -> None:
        reply = await vramchat_app(self).client.request("models")
        self.models = reply["models"]
        if not self.models:
            where = ", ".join(reply["model_dirs"]) or "any model dir"
            self.query_one("#models-hint", Label).update(f"no models found in {where}")
        self.describe_models()

    @work(thread=True, exclusive=True, exit_on_error=False, group="describe")
    def describe_models(self) -> None:
        """Reading the GGUF headers and planning takes a moment for many big models."""
        host = machine(vramchat_app(self).state)
        rows = [model_table.describe(model, host, loaded="● ") for model in self.models]
        self.app.call_from_thread(self.show_rows, rows)

    def show_rows(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows
        self.lay_out()

    def on_resize(self) -> None:
        if self.rows:
            self.call_after_refresh(self.lay_out)

    def lay_out(self) -> None:
        """The columns that fit the table's width, rebuilt when the terminal is resized."""
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        width = table.size.width
        if len(self.rows) + 1 > table.size.height:  # a vertical scrollbar will take its share
            width -= table.styles.scrollbar_size_vertical
        fitted = model_table.fit(self.rows, model_table.COLUMNS, width, padding=2 * table.cell_padding)
        table.clear(columns=True)
        for column, column_width in fitted:
            table.add_column(column.label, width=column_width, key=column.key)
        for row, model in zip(self.rows, self.models, strict=True):
            table.add_row(*(model_table.cut(row[c.key], w) for c, w in fitted), key=model["path"])
        table.move_cursor(row=cursor)

    @on(DataTable.RowSelected)
    def choose(self, event: DataTable.RowSelected) -> None:
        model = next(m for m in self.models if m["path"] == event.row_key.value)
        self.app.push_screen(LoadDialog(model), self.loaded)

    def loaded(self, model: dict[str, Any] | None) -> None:
        if model:
            self.app.pop_screen()

    def action_get_from_hub(self) -> None:
        self.app.push_screen(HubDialog(), self.downloaded)

    def downloaded(self, model: dict[str, Any] | None) -> None:
        """A model the daemon has just downloaded: list it, and offer to load it."""
        if model:
            self.list_models()
            self.app.push_screen(LoadDialog(model), self.loaded)
