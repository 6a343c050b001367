"""A plan checked by llama.cpp's own allocator before a byte is allocated.

The formula (shared/planner.py) is instant and needs only a header, so it sweeps every layout;
its compute term is an estimate. For the one layout a load is about to use, a dry run
(`python -m vramchat.daemon.llama.dry_run`, a short-lived llama.cpp process like the engine)
loads the model with llama.cpp's `no_alloc`, builds the context, and logs the compute and output
buffers its allocator sizes on every device, as llama.cpp's own fit (common/fit.cpp) does. Those
replace the formula's; a fitted plan they put over a device's budget steps down and is checked
again, so no layout a dry run put over budget is loaded. Weights, KV cache and the per-backend
overhead stay the formula's: the first two are exact, and llama.cpp logs no overhead.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from vramchat.shared.fit import Fit
from vramchat.shared.llama_log import LoadReport, parse_load_log
from vramchat.shared.load_plan import LoadPlan, fit_reason, plan_load, swap_check
from vramchat.shared.planner import Prediction, RamTerms, Side

# A dry run reads the header and builds the graph: 0.3 to 0.4 s in all, from the demo model to a
# 7B layout (benchmarks/dry_run.py). Longer means an RPC server is serving another client.
DRY_RUN_TIMEOUT_S = 120.0

# One dry run: the layout's report, and the seconds it took.
Measure = Callable[[LoadPlan], tuple[LoadReport, float]]


class DryRunError(Exception):
    """llama.cpp could not build this layout; the message is its reason."""


def dry_run(load: dict[str, Any], timeout: float = DRY_RUN_TIMEOUT_S) -> tuple[LoadReport, float]:
    """llama.cpp's buffers for `load` (LoadPlan.llama_load), from a dry run in a process of its own,
    so that llama.cpp never runs in the caller; and the seconds it cost, the process's start included."""
    command = [sys.executable, "-m", "vramchat.daemon.llama.dry_run"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, input=json.dumps(load), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        why = "is one of its RPC servers serving another client? It serves one at a time" if load.get("rpc_servers") else ""
        raise DryRunError(f"llama.cpp's dry run did not finish within {timeout:.0f} s" + (f": {why}" if why else "")) from None
    lines = done.stdout.strip().splitlines()
    try:
        answer: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        answer = {"error": _crash_text(done.returncode, done.stderr)}
    if "error" in answer:
        raise DryRunError(answer["error"])
    return parse_load_log(answer["log"]), time.monotonic() - started


def _crash_text(returncode: int, stderr: str) -> str:
    """What a dry run that died says: llama.cpp aborts (GGML_ASSERT) on some malformed files."""
    how = f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"
    tail = "; ".join(line.strip() for line in stderr.strip().splitlines()[-3:])
    return f"llama.cpp's dry run {how}" + (f" ({tail})" if tail else "")


def with_allocator_figures(prediction: Prediction, report: LoadReport) -> Prediction:
    """`prediction` with llama.cpp's compute and output buffers from a dry run of its layout: each
    offload device's under its log name, and the host's (CPU, CUDA_Host) on the CPU side."""
    exact = copy.deepcopy(prediction)
    for share in exact.devices:
        share.side.compute = report.total("compute", device=share.device.log_name)
        share.side.output = report.total("output", device=share.device.log_name)
    exact.cpu.compute = report.total("compute", gpu=False)
    exact.cpu.output = report.total("output", gpu=False)
    exact.gpu = Side()
    for share in exact.devices:
        exact.gpu.add(share.side)
    ram = exact.ram
    exact.ram = RamTerms(exact.cpu.total - ram.mapped_read - ram.mapped_cache, ram.mapped_read, ram.mapped_cache)
    return exact


def over_budget(plan: LoadPlan) -> list[int]:
    """The indexes of the offload devices whose planned total exceeds their budget."""
    budgets = plan.fitted.budgets
    devices = plan.prediction.devices
    return [i for i, share in enumerate(devices) if share.side.total > budgets.get(share.device.name, share.side.total)]


def checked(plan: LoadPlan, measure: Measure) -> LoadPlan:
    """`plan` with llama.cpp's compute and output buffers for its layout (`measure`, a dry run).

    A fitted plan (`steps_down`) that they put over a device's budget gives back what the fit
    gives back, a layer of that device or the experts of one more layer, and is measured again,
    skipping the layouts that would still be over by what the formula missed. At 0 layers nothing
    is left to give back. Raises what `measure` raises (DryRunError).
    """
    runs, seconds, candidate, first_over = 0, 0.0, plan, ""
    while True:
        report, took = measure(candidate)
        runs, seconds = runs + 1, seconds + took
        prediction = with_allocator_figures(candidate.prediction, report)
        swap = swap_check(prediction, candidate.machine.available_ram)
        exact = replace(
            candidate, prediction=prediction, formula=candidate.prediction, swap=swap, dry_runs=runs, dry_run_seconds=seconds
        )
        over = over_budget(exact)
        first_over = first_over or ", ".join(prediction.devices[i].device.name for i in over)
        if over and candidate.steps_down is not None:
            missed = [e.side.total - f.side.total for e, f in zip(prediction.devices, candidate.prediction.devices, strict=True)]
            lower = _step(candidate, over)
            while lower is not None and (still := _over_by(lower, missed)) and (further := _step(lower, still)) is not None:
                lower = further
            if lower is not None:
                candidate = lower
                continue
        return exact if candidate is plan else _explained(exact, plan, first_over)


def _over_by(plan: LoadPlan, missed: Sequence[int]) -> list[int]:
    """The devices the formula puts over budget once what it missed at the last dry run is added."""
    budgets = plan.fitted.budgets
    return [
        i
        for i, share in enumerate(plan.prediction.devices)
        if share.device.name in budgets and share.side.total + max(0, missed[i]) > budgets[share.device.name]
    ]


def _step(plan: LoadPlan, over: Sequence[int]) -> LoadPlan | None:
    """One step down from `plan`, as the fit steps: the experts of one more layer to RAM while the fit
    chose experts in RAM; else a layer fewer, taken from the devices over budget when the fit chose
    each device's count. None at 0 layers."""
    info, settings, layers, split = plan.info, plan.settings, plan.n_gpu_layers, plan.tensor_split
    n_cpu_moe = settings.n_cpu_moe
    if plan.steps_down == "experts" and (n_cpu_moe or 0) < info.n_layer:
        n_cpu_moe = (n_cpu_moe or 0) + 1
    elif split is not None and settings.tensor_split is None:
        fewer = tuple(count - 1 if i in over and count > 0 else count for i, count in enumerate(split))
        if fewer == split:
            return None
        split, layers = fewer, int(sum(fewer))
    elif layers > 0:
        layers -= 1
    else:
        return None
    stepped = plan_load(
        info,
        plan.machine,
        layers,
        replace(settings, n_cpu_moe=n_cpu_moe, tensor_split=split or settings.tensor_split),
        vram_budget=plan.fitted.budgets,
    )
    fitted = Fit(
        layers,
        stepped.prediction.n_ctx,
        plan.fitted.budget,
        plan.fitted.budgets,
        stepped.prediction,
        layers == info.n_layer + 1,
        stepped.tensor_split,
    )
    # The settings stay as asked (the split: the person's), as plan_load leaves them.
    return replace(
        stepped, settings=replace(stepped.settings, tensor_split=settings.tensor_split), fitted=fitted, steps_down=plan.steps_down
    )


def _explained(exact: LoadPlan, first: LoadPlan, over: str) -> LoadPlan:
    """`exact`, stepped down from the fit's `first` choice, with the fit's line saying why."""
    row = first.prediction
    was = f"experts of {row.cpu_expert_layers} layers in RAM" if first.steps_down == "experts" else f"{row.n_gpu_layers} layers"
    line = fit_reason(replace(exact.fitted, prediction=exact.prediction), exact.prediction.tokens_per_s or 0.0)
    note = f"; with the formula's {was}, llama.cpp's dry run put {over} over budget"
    return replace(exact, fitted=replace(exact.fitted, reason=line + note))
