"""`make bench`: run every benchmark, print its figures, append a dated section to docs/benchmarks.md.

--quick runs each once, briefly (the smoke test); --no-write leaves the doc alone. Names given on
the command line run only those benchmarks. The exit status is 1 if any benchmark failed to run
(a missed target is not a failure: it is reported, with its explanation).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import loadavg, machine
from vramchat.shared import scheduling

BENCHMARKS = [
    "streaming_overhead",
    "token_latency",
    "token_hops",
    "fanout",
    "ttft",
    "model_switch",
    "footprint",
    "resume_conversation",
    "sampler_cpu",
    "tui_lag",
    "http_api",
    "long_conversation",
    "rpc_offload",
    "speed_estimate",
    "idle_unload",
    "hub_list",
    "hub_pull",
    "dry_run",
    "tui_cost",
    "structured_output",
]
DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"
META = {"name", "settings", "targets", "target", "met", "why", "error"}


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def targets_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Targets in the common form; a module that gives one flat `target` and `met` gets one row."""
    if "targets" in result:
        return list(result["targets"])
    if "target" in result:
        return [
            {
                "figure": None,
                "target": result["target"],
                "met": result.get("met"),
                "why": result.get("why") or ("the benchmark gives no explanation" if result.get("met") is False else None),
            }
        ]
    return []


def section(result: dict[str, Any]) -> str:
    lines = [f"\n### {result['name']}\n"]
    if "error" in result:
        return "\n".join([*lines, f"Failed to run: `{result['error']}`\n"])
    if settings := result.get("settings"):
        lines.append("Settings: " + "; ".join(f"{k} {fmt(v)}" for k, v in settings.items()) + ".\n")
    goals = {t["figure"]: t for t in targets_of(result)}
    lines += ["| figure | value | target | met |", "| --- | --- | --- | --- |"]
    for key, value in result.items():
        if key in META:
            continue
        goal = goals.get(key)
        lines.append(f"| {key} | {fmt(value)} | {goal['target'] if goal else ''} | {fmt(goal['met']) if goal else ''} |")
    if None in goals:  # a flat target that names no figure
        goal = goals[None]
        lines.append(f"| (whole benchmark) | | {goal['target']} | {fmt(goal['met'])} |")
    misses = [t for t in targets_of(result) if t.get("met") is False]
    if misses:
        lines.append("")
        for miss in misses:
            value = f" = {fmt(result[miss['figure']])}" if miss["figure"] in result else ""
            lines.append(f"- **Missed** {miss['figure'] or result['name']}{value} (target {miss['target']}): {miss['why']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="one short run of each (smoke test)")
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("only", nargs="*", metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(BENCHMARKS):
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    scheduling.use_short_slice()  # this process is the daemon's client, as the TUI is
    started = time.time()
    where = machine()
    print(f"==> machine: {json.dumps(where)}", flush=True)
    results: list[dict[str, Any]] = []
    failed = False
    for name in args.only or BENCHMARKS:
        print(f"==> {name} (load average {loadavg()})", flush=True)
        began = time.monotonic()
        try:
            result = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        except Exception as exc:
            traceback.print_exc()
            failed = True
            result = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        result.setdefault("settings", {})
        print(json.dumps(result, indent=2, default=str), flush=True)
        print(f"==> {name} took {time.monotonic() - began:.0f} s", flush=True)
        results.append(result)
    took = time.time() - started
    print(f"==> all took {took:.0f} s; load average now {loadavg()}")
    if not args.no_write:
        head = (
            f"\n## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}{' (quick)' if args.quick else ''}\n\n"
            f"Machine: {where['cpu']}, {where['cores']} cores, {where['ram_gib']} GiB RAM, Linux {where['kernel']}, "
            f"Python {where['python']}, llama-cpp-python {where['llama_cpp_python']}, pyzmq {where['pyzmq']} "
            f"(libzmq {where['libzmq']}). Load average at the start {where['load_average']}, at the end {loadavg()}. "
            f"A one-byte pipe round trip to a bare echo process, the cost of waking a sleeping process here: "
            f"{where['pipe_round_trip_ms']['back_to_back']:.2f} ms back to back, "
            f"{where['pipe_round_trip_ms']['after_0.3_s_idle']:.2f} ms after 0.3 s idle. Took {took:.0f} s.\n"
        )
        with DOC.open("a") as doc:
            doc.write(head + "".join(section(r) for r in results))
        print(f"==> appended to {DOC}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
