"""The options of a load besides the model and its layer count: read from a `load` request (the
config giving the defaults) and checked, then handed to the planner as PlanSettings and to the
engine as Llama() arguments. `vramchat load`, `vramchat plan` and the TUI's load dialog send the
same fields (docs/protocol.md, `load`)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from typing import Any, NoReturn

from vramchat.shared.placement import SPLIT_MODES, SplitMode
from vramchat.shared.planner import PlanError, PlanSettings

# ggml_type of each KV cache type, as Llama(type_k=, type_v=) takes them (ggml.h).
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
# enum llama_split_mode
SPLIT_MODE_IDS = {"none": 0, "layer": 1, "row": 2}


def parse_tensor_split(text: str) -> tuple[float, ...]:
    """ "3,1" -> (3.0, 1.0): each offload device's share, in llama.cpp's device order."""
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"a tensor split is shares separated by commas, e.g. 3,1; not {text!r}") from None
    return shares


def _tensor_split(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_tensor_split(value)
    if isinstance(value, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        return tuple(float(x) for x in value)
    raise PlanError(f"tensor_split must be a list of numbers (one share per offload device), not {value!r}")


FLASH_ATTN_MODES = ("on", "off", "auto")
# llama.cpp's pattern for the expert tensors of a mixture-of-experts layer (common/arg.cpp).
EXPERTS_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
ALL_LAYERS = 1 << 30  # n_cpu_moe for --cpu-moe: more layers than any model has


def _whole(name: str, value: Any, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise PlanError(f"{name} must be a whole number >= {least}, not {value!r}")
    return value


def settings_from(body: Mapping[str, Any], defaults: Mapping[str, Any], n_ctx: int, n_threads: int | None = None) -> PlanSettings:
    """PlanSettings for a request `body`, with `defaults` (the config's) for the fields it leaves out.

    Raises PlanError saying what to change. What depends on the devices (a main_gpu that
    exists, as many shares as devices) is checked by the planner, which knows them.
    """

    def get(name: str, default: Any = None) -> Any:
        value = body.get(name)
        value = defaults.get(name) if value is None else value
        return default if value is None else value

    split_mode: SplitMode = get("split_mode", "layer")
    if split_mode not in SPLIT_MODES:
        raise PlanError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, not {split_mode!r}")
    try:
        tensor_split = _tensor_split(get("tensor_split"))
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    flash_attn = get("flash_attn", "off")
    if flash_attn not in (*FLASH_ATTN_MODES, True, False):
        raise PlanError(f"flash_attn must be one of {', '.join(FLASH_ATTN_MODES)}, not {flash_attn!r}")
    cache_types = {}
    for name in ("cache_type_k", "cache_type_v"):
        cache_types[name] = get(name, "f16")
        if cache_types[name] not in (*GGML_TYPE_IDS, "auto"):
            raise PlanError(f"{name} must be one of {', '.join(GGML_TYPE_IDS)} or auto, not {cache_types[name]!r}")
    n_cpu_moe = get("n_cpu_moe")
    for flag in ("use_mmap", "use_mlock"):
        if not isinstance(get(flag, False), bool):
            raise PlanError(f"{flag} must be true or false, not {get(flag)!r}")
    settings = PlanSettings(
        n_ctx=n_ctx,
        n_batch=_whole("n_batch", get("n_batch", 512), 1),
        n_ubatch=_whole("n_ubatch", get("n_ubatch", 512), 1),
        cache_type_k=cache_types["cache_type_k"],
        cache_type_v=cache_types["cache_type_v"],
        flash_attn="auto" if flash_attn == "auto" else flash_attn in ("on", True),
        split_mode=split_mode,
        main_gpu=_whole("main_gpu", get("main_gpu", 0), 0),
        tensor_split=tensor_split,
        n_threads=n_threads,
        n_cpu_moe=None if n_cpu_moe is None else ALL_LAYERS if n_cpu_moe == "all" else _whole("n_cpu_moe", n_cpu_moe, 0),
        use_mmap=get("use_mmap", True),
        use_mlock=get("use_mlock", False),
    )
    settings.check()
    return settings


def cpu_tensor_patterns(settings: PlanSettings, n_layer: int) -> list[str]:
    """The tensor-name patterns the engine keeps in host RAM (daemon/llama/params.py)."""
    layers = settings.n_cpu_moe or 0
    if layers >= n_layer:
        return [EXPERTS_PATTERN]
    return [rf"blk\.{layer}{EXPERTS_PATTERN}" for layer in range(layers)]


def llama_args(settings: PlanSettings, *, n_gpu_layers: int, tensor_split: tuple[float, ...] | None) -> dict[str, Any]:
    """The Llama() keyword arguments for a load with these settings (daemon/llama/chat_model.py)."""
    return {
        "n_gpu_layers": n_gpu_layers,
        "n_ctx": settings.n_ctx,
        "n_threads": settings.n_threads,
        "n_batch": settings.n_batch,
        "n_ubatch": settings.n_ubatch,
        "type_k": GGML_TYPE_IDS[settings.cache_type_k],
        "type_v": GGML_TYPE_IDS[settings.cache_type_v],
        "flash_attn": bool(settings.flash_attn),  # "auto": daemon/llama/params.py passes llama.cpp's auto
        "split_mode": SPLIT_MODE_IDS[settings.split_mode],
        "main_gpu": settings.main_gpu,
        "tensor_split": list(tensor_split) if tensor_split else None,
        "use_mmap": settings.use_mmap,
        "use_mlock": settings.use_mlock,
    }


def _tensor_split_flag(text: str) -> tuple[float, ...]:
    try:
        return parse_tensor_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise PlanError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The load options as llama.cpp's own flags, for `vramchat load` and `vramchat plan`."""
    parser.add_argument(
        "--tensor-split", type=_tensor_split_flag, metavar="A,B,...", help="each offload device's share of the layers"
    )
    parser.add_argument("--split-mode", choices=SPLIT_MODES, help="layer (default), none (main GPU only) or row (CUDA only)")
    parser.add_argument("--main-gpu", type=int, metavar="N", help="the device index used with --split-mode none or row")
    parser.add_argument("--cache-type-k", "-ctk", choices=GGML_TYPE_IDS, help="KV cache type for K (default f16)")
    parser.add_argument(
        "--cache-type-v", "-ctv", choices=GGML_TYPE_IDS, help="KV cache type for V (quantized: needs flash attention)"
    )
    parser.add_argument("--flash-attn", "-fa", choices=FLASH_ATTN_MODES, help="flash attention (default off)")
    parser.add_argument("--batch-size", "-b", type=int, dest="n_batch", metavar="N", help="logical batch (default 512)")
    parser.add_argument("--ubatch-size", "-ub", type=int, dest="n_ubatch", metavar="N", help="physical batch (default 512)")
    parser.add_argument("--n-cpu-moe", "-ncmoe", type=int, metavar="N", help="keep the experts of the first N layers in RAM")
    parser.add_argument("--cpu-moe", "-cmoe", action="store_true", help="keep the experts of every layer in RAM")
    parser.add_argument("--mlock", action="store_true", help="lock the model's weights in RAM")
    parser.add_argument("--no-mmap", action="store_true", help="read the weights into memory instead of mapping the file")


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `load` request fields of the options given on a command line."""
    fields = {
        "tensor_split": args.tensor_split,
        "split_mode": args.split_mode,
        "main_gpu": args.main_gpu,
        "cache_type_k": args.cache_type_k,
        "cache_type_v": args.cache_type_v,
        "flash_attn": args.flash_attn,
        "n_batch": args.n_batch,
        "n_ubatch": args.n_ubatch,
        "n_cpu_moe": "all" if args.cpu_moe else args.n_cpu_moe,
        "use_mlock": True if args.mlock else None,
        "use_mmap": False if args.no_mmap else None,
    }
    return {name: list(value) if isinstance(value, tuple) else value for name, value in fields.items() if value is not None}


def parse_flags(text: str) -> dict[str, Any]:
    """The `load` request fields of options typed as flags (the TUI's load dialog); PlanError if bad."""
    parser = _Parser(prog="options", add_help=False)
    add_arguments(parser)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise PlanError(f"options: {exc}") from None
    return request_fields(parser.parse_args(words))
