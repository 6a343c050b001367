"""The fit: the most layers (or the fewest experts in RAM) at which every offload device's
predicted total is within its budget, and the KV cache type that lets the most fit.

shared/load_plan.py's `plan_load` runs it on the formula's figures (shared/planner.py `predict`),
then, for the layout it picks, checks it against llama.cpp's own allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from vramchat.shared.gguf import GGUFInfo
from vramchat.shared.placement import OffloadDevice
from vramchat.shared.planner import PlanSettings, Prediction, predict

DEFAULT_SETTINGS = PlanSettings()


@dataclass
class Fit:
    n_gpu_layers: int
    n_ctx: int
    budget: int  # over every device
    budgets: dict[str, int]  # by device name
    prediction: Prediction
    fits_all: bool
    # With several devices: the layers (output included) the fit gives each, as llama.cpp's tensor_split.
    tensor_split: tuple[float, ...] | None = None
    reason: str = ""  # the choice in one line, for a person

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prediction": self.prediction.to_dict()}


def over_budget(prediction: Prediction, budgets: Sequence[int]) -> list[int]:
    """The indexes of the devices whose predicted total exceeds their budget."""
    return [i for i, share in enumerate(prediction.devices) if share.side.total > budgets[i]]


def _fill(layers: int, caps: Sequence[int]) -> list[int] | None:
    """`layers` shared out in device order, each device taking up to its cap; None if they don't fit."""
    counts, left = [], layers
    for cap in caps:
        counts.append(min(cap, left))
        left -= counts[-1]
    return counts if left == 0 else None


def _most_layers(info: GGUFInfo, budgets: Sequence[int], settings: PlanSettings, devices: Sequence[OffloadDevice]) -> Fit:
    top = info.n_layer + 1
    if len(budgets) < 2 or settings.tensor_split is not None or settings.split_mode != "layer":
        # One device, or the shares are given: the most layers at which every device fits.
        best = predict(info, 0, settings, devices)
        for layers in range(1, top + 1):
            candidate = predict(info, layers, settings, devices)
            if not over_budget(candidate, budgets):
                best = candidate
        return Fit(best.n_gpu_layers, best.n_ctx, sum(budgets), {}, best, best.n_gpu_layers == top, settings.tensor_split)
    # Several devices: choose the shares too. Fill the devices in llama.cpp's order, and whenever a
    # device comes out over its budget, lower what it may take by one layer and try again. With
    # every layer offloaded the scheduler pipelines (more compute memory on each device), so the
    # limits found there do not hold below it.
    caps = [top] * len(budgets)
    for layers in range(top, 0, -1):
        if layers == top - 1:
            caps = [top] * len(budgets)
        while (counts := _fill(layers, caps)) is not None:
            split = tuple(float(c) for c in counts)
            candidate = predict(info, layers, replace(settings, tensor_split=split), devices)
            over = over_budget(candidate, budgets)
            if not over:
                return Fit(layers, candidate.n_ctx, sum(budgets), {}, candidate, layers == top, split)
            for i in over:
                caps[i] = max(0, counts[i] - 1)
    best = predict(info, 0, settings, devices)
    return Fit(0, best.n_ctx, sum(budgets), {}, best, False, None)


def fit(
    info: GGUFInfo,
    budgets: int | Sequence[int],
    settings: PlanSettings = DEFAULT_SETTINGS,
    devices: Sequence[OffloadDevice] = (),
    *,
    fit_ctx: bool = False,
) -> Fit:
    """The most GPU layers at which each device's predicted total is within its budget (0 if none
    fits); `budgets` follows the used devices' order (one number: one device).

    With `fit_ctx`, first the largest n_ctx (up to the trained context, in steps of 256) at which
    every layer fits, if any does; otherwise the layers are fitted at settings.n_ctx.
    """
    budget_list = [budgets] if isinstance(budgets, int) else list(budgets)
    if fit_ctx:
        best_ctx = None
        for n_ctx in range(256, max(info.n_ctx_train, 256) + 1, 256):
            if _most_layers(info, budget_list, replace(settings, n_ctx=n_ctx), devices).fits_all:
                best_ctx = n_ctx
            else:
                break
        if best_ctx is not None:
            settings = replace(settings, n_ctx=best_ctx)
    result = _most_layers(info, budget_list, settings, devices)
    result.budgets = {share.device.name: b for share, b in zip(result.prediction.devices, budget_list, strict=True)}
    return result


def experts_in_ram(
    info: GGUFInfo, budgets: Sequence[int], settings: PlanSettings, devices: Sequence[OffloadDevice]
) -> Fit | None:
    """Every layer offloaded with the experts of as few leading layers as possible left in RAM (the
    llama.cpp users' -ngl 99 --n-cpu-moe N); None if even all experts in RAM do not fit."""
    top = info.n_layer + 1

    def fits(layers_in_ram: int) -> bool:
        with_experts = replace(settings, n_cpu_moe=layers_in_ram)
        if len(budgets) == 1:  # one prediction decides; several devices need their split fitted
            return not over_budget(predict(info, top, with_experts, devices), budgets)
        return fit(info, budgets, with_experts, devices).fits_all

    low, high = 0, info.n_layer
    if not fits(high):
        return None
    while low < high:  # the fewest layers whose experts must stay in RAM
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return fit(info, budgets, replace(settings, n_cpu_moe=low), devices)


AUTO = "auto"  # a KV cache type for the fit to choose


def choose_kv_types(
    info: GGUFInfo, budgets: Sequence[int], settings: PlanSettings, devices: Sequence[OffloadDevice], *, fit_ctx: bool
) -> tuple[PlanSettings, str]:
    """The most precise KV cache types at which every layer fits (with `fit_ctx`: the ones giving
    the longest context), else those giving the most layers; and why, for the fit's line.

    Quantized V needs flash attention: without it only K is quantized (llama.cpp allows that).
    """
    quantize_v = bool(settings.flash_attn)
    candidates = [(k, k if quantize_v else "f16") for k in ("f16", "q8_0", "q4_0")]

    def typed(k: str, v: str) -> PlanSettings:
        return replace(
            settings,
            cache_type_k=k if settings.cache_type_k == AUTO else settings.cache_type_k,
            cache_type_v=v if settings.cache_type_v == AUTO else settings.cache_type_v,
        )

    options = [typed(k, v) for k, v in dict.fromkeys(candidates)]
    fits = [fit(info, budgets, option, devices, fit_ctx=fit_ctx) for option in options]
    if fit_ctx:
        best = max(range(len(options)), key=lambda i: (fits[i].fits_all, fits[i].n_ctx, -i))
    else:
        best = next(
            (i for i, f in enumerate(fits) if f.fits_all), max(range(len(options)), key=lambda i: (fits[i].n_gpu_layers, -i))
        )
    chosen = options[best]
    why = "every layer fits" if fits[best].fits_all else f"{fits[best].n_gpu_layers} layers fit"
    if fit_ctx:
        why += f" at n_ctx {fits[best].n_ctx}"
    if best > 0:
        why += f"; at {options[0].cache_type_k}/{options[0].cache_type_v}, " + (
            f"n_ctx {fits[0].n_ctx}" if fit_ctx else f"{fits[0].n_gpu_layers} layers"
        )
    return chosen, f"; KV cache {chosen.cache_type_k}/{chosen.cache_type_v}: {why}"
