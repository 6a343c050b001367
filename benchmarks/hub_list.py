"""`vramchat pull REPO --list` against the Hub stand-in on loopback (tests/hub_standin.py), serving
real quantizations of the demo model: Q8_0 and Q2_K files and a Q4_K_M folder of 3 shards.

The command's wall time is the whole CLI process: imports, the listing, the header reads by Range
and planning each quantization. On loopback a request costs next to nothing; on the real Hub each
costs a round trip (~0.1 s), so the requests one listing makes are reported too (header reads run
8 at once). Target: the listing reads under 10% of the repo's bytes, as the issue asks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import demo_model, loadavg, median, target

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from hub_repos import INSTRUCT_REPO, make_hub_repos
from hub_standin import HubStandin

COMMAND = [sys.executable, "-m", "vramchat.tui.cli", "pull", INSTRUCT_REPO, "--list", "--json"]


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 5
    root = Path(tempfile.mkdtemp(prefix="vcb-hub-"))
    try:
        make_hub_repos(root, demo_model())
        with HubStandin(root) as standin:
            seconds, requests, read = [], [], []
            for _ in range(rounds):
                before, asked = standin.bytes_served(), len(standin.requests)
                started = time.perf_counter()
                done = subprocess.run(COMMAND, env=standin.env(), capture_output=True, text=True, check=True)
                seconds.append(time.perf_counter() - started)
                requests.append(len(standin.requests) - asked)
                read.append(standin.bytes_served() - before)
            quants = json.loads(done.stdout)["quants"]
            size = standin.repo_bytes(INSTRUCT_REPO)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import vramchat.tui.cli"], check=True)
            imports = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fraction = max(read) / size
    return {
        "name": "vramchat pull --list (Hub stand-in on loopback)",
        "settings": {
            "repo": f"{len(quants)} quantizations of SmolLM2-135M-Instruct, {sum(len(q['files']) for q in quants)} GGUF files",
            "rounds": rounds,
            "loadavg": loadavg(),
        },
        "list_seconds_median": median(seconds),
        "cli_start_seconds": imports,
        "requests_per_list": max(requests),
        "bytes_read_per_list": max(read),
        "repo_bytes": size,
        "bytes_read_fraction": fraction,
        "targets": [
            target(
                "bytes_read_fraction",
                "< 0.1",
                fraction < 0.1,
                "each GGUF header is read in Range requests of 2 MiB first, then doubling, so up to twice the header",
            )
        ],
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
