"""The models table of the models screen and `vramchat models`: a row per model, and the columns that fit a width.

At 80 columns not everything fits beside a 40-character file name, so each column has a
priority: the narrower the terminal, the more of the optional ones are left out; the name is cut
(with "…") only when the required ones would not fit beside it whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vramchat.shared.gguf import GGUFError, inspect_cached, quant_name
from vramchat.shared.load_plan import Machine, plan_load
from vramchat.shared.planner import PlanSettings
from vramchat.shared.units import format_bytes


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    priority: int  # 0 is kept longest; a narrower terminal leaves out the highest numbers first
    shrink_to: int | None = None  # the narrowest this column may be cut to; None: never cut
    numeric: bool = False  # right-aligned in plain text
    optional: bool = False  # left out before the name is cut


COLUMNS: tuple[Column, ...] = (
    Column("model", "model", 0, shrink_to=20),
    Column("arch", "arch", 6, optional=True),
    Column("size", "size", 1, numeric=True),
    Column("quant", "quant", 2),
    Column("layers", "layers", 4, numeric=True, optional=True),
    Column("ctx", "ctx", 5, numeric=True, optional=True),
    Column("fits", "fits", 3),
)
SOURCE = Column("source", "source", 7, optional=True)  # where the file was found; `vramchat models` only


def describe(model: dict[str, Any], host: Machine, loaded: str, unloaded: str = "") -> dict[str, str]:
    """One model of the daemon's `models` reply as table cells: its GGUF's metadata, and where
    the planner would put it on `host` (at most 4096 tokens of context). A path this machine
    cannot read (a daemon elsewhere) gets question marks. The name starts with `loaded` for the
    loaded model, else with `unloaded`, and a split model's ends with its file count; the size
    is of all its files, and the quantization the one its hub name gives, else its file type."""
    shards = model.get("shards", 1)
    name = (loaded if model.get("loaded") else unloaded) + model["name"] + (f" ({shards} files)" if shards > 1 else "")
    row = {"model": name, "size": format_bytes(model["size_bytes"]), "source": model["source"]}
    try:
        info = inspect_cached(model["path"])
    except (GGUFError, OSError):
        return {**row, "arch": "?", "quant": model.get("quant", "?"), "layers": "?", "ctx": "?", "fits": "unreadable"}
    plan = plan_load(info, host, "auto", PlanSettings(n_ctx=min(4096, info.n_ctx_train or 4096)))
    if plan.swap.would_swap:
        verdict = "would swap"
    elif plan.fitted.fits_all:
        verdict = "all on GPU"
    elif plan.budget:
        verdict = f"{plan.n_gpu_layers}/{info.n_layer + 1} on GPU"
    else:
        verdict = "CPU only"  # no GPU, or too little VRAM for a layer; it fits RAM
    return {
        **row,
        "arch": info.architecture,
        "quant": model.get("quant") or quant_name(info.file_type),
        "layers": str(info.n_layer),
        "ctx": str(info.n_ctx_train),
        "fits": verdict,
    }


def fit(rows: Sequence[dict[str, str]], columns: Sequence[Column], width: int, padding: int) -> list[tuple[Column, int]]:
    """The columns that fit in `width`, in their order, each with the width its cells get.

    The required columns come first: at their natural width (the widest cell), a shrinkable one
    (the name) at its minimum, and when even that is too wide, the least needed go. What is
    left widens the name back to its full length, then takes optional columns by priority
    while they fit whole. `padding` is what each column adds around its cells.
    """
    natural = {c.key: max([len(c.label), *(len(row[c.key]) for row in rows)]) for c in columns}
    widths = {c.key: min(natural[c.key], c.shrink_to or natural[c.key]) for c in columns if not c.optional}
    by_priority = sorted(columns, key=lambda c: c.priority)
    for column in reversed(by_priority):
        if sum(w + padding for w in widths.values()) <= width:
            break
        widths.pop(column.key, None)
    spare = width - sum(w + padding for w in widths.values())
    for column in by_priority:
        if column.key in widths:
            grow = max(0, min(spare, natural[column.key] - widths[column.key]))
            widths[column.key] += grow
            spare -= grow
        elif column.optional and natural[column.key] + padding <= spare:
            widths[column.key] = natural[column.key]
            spare -= natural[column.key] + padding
    return [(c, widths[c.key]) for c in columns if c.key in widths]


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, with an ellipsis where it was cut."""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def text_table(rows: Sequence[dict[str, str]], columns: Sequence[Column], width: int) -> list[str]:
    """Plain-text lines, a header first, of the columns that fit in `width` (two spaces between)."""
    fitted = fit(rows, columns, width + 2, padding=2)  # the last column needs no gap after it

    def line(cells: dict[str, str]) -> str:
        parts = [cut(cells[c.key], w).rjust(w) if c.numeric else cut(cells[c.key], w).ljust(w) for c, w in fitted]
        return "  ".join(parts).rstrip()

    return [line({c.key: c.label for c in columns}), *(line(row) for row in rows)]
