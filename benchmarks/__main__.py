"""`make bench`: run every benchmark, print the figures, append them to docs/benchmarks.md.

--quick runs each once, briefly (the CI smoke test); --no-write leaves the doc alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine

BENCHMARKS = ["streaming", "resume_conversation", "footprint", "sampler_cpu"]
DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="one short run of each (smoke test)")
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("only", nargs="*", metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(BENCHMARKS):
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    started = time.time()
    where = machine()
    results: list[dict[str, Any]] = []
    for name in args.only or BENCHMARKS:
        print(f"==> {name}", flush=True)
        result = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if not args.no_write:
        with DOC.open("a") as doc:
            doc.write(f"\n## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}"
                      f"{' (quick)' if args.quick else ''}\n\nMachine: {where}. Took {time.time() - started:.0f} s.\n")
            for result in results:
                doc.write(f"\n### {result['name']}\n\n| figure | value |\n| --- | --- |\n")
                for key, value in result.items():
                    if key != "name":
                        doc.write(f"| {key} | {value:.3f} |\n" if isinstance(value, float) else f"| {key} | {value} |\n")
        print(f"==> appended to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
