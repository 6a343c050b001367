"""`vramchat pull` against curl: the download throughput of a pull through the daemon, from the Hub
stand-in on loopback (tests/hub_standin.py, serving real quantizations of the demo model), against
curl copying the same bytes from the same stand-in to the same disk.

A pull is timed as a person waits for it: from the `pull` request to its `complete` event, so it
includes asking the Hub for the listing, the sha256 of every byte, and linking the snapshot. A
first pull, not counted, warms the daemon up (it imports huggingface_hub's HTTP stack then). Each
round deletes the pulled blob first; pull and curl alternate, so neither gets a warmer page cache.
Twice: as fast as loopback goes, where the CPU is the limit, and with the stand-in throttled to
1 Gbit/s, a link to the Hub. Also measured: the listing alone (request to reply), and hashing the
file alone in this process, which is CPU a pull spends and curl does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import daemon, demo_model, loadavg, median, target
from vramchat.shared.client import Client

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from hub_repos import INSTRUCT_REPO, make_hub_repos
from hub_standin import HubStandin

QUANT, FILE = "Q8_0", "SmolLM2-135M-Instruct-Q8_0.gguf"
RATIO_TARGET = 0.9
GIGABIT = 125e6  # bytes/s: a fast home or office link to the Hub; loopback alone is CPU-bound


async def pull_once(client: Client, events: Any) -> tuple[float, float]:
    """Seconds from the `pull` request to its reply (the listing), and to its `complete` event."""
    started = time.perf_counter()
    accepted = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": QUANT})
    listed = time.perf_counter() - started
    download_id = accepted["download"]["id"]
    async for event in events:
        if event.topic == "download" and event.body["id"] == download_id and event.body["state"] in ("complete", "error"):
            if event.body["state"] != "complete":
                raise RuntimeError(f"the pull failed: {event.body['error']}")
            return listed, time.perf_counter() - started
    raise RuntimeError("the event stream ended")


def hash_once(path: Path) -> float:
    started = time.perf_counter()
    with path.open("rb") as handle:
        hashlib.file_digest(handle, "sha256")
    return time.perf_counter() - started


def curl_once(url: str, target_dir: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "--silent", "--fail", "--output", str(target_dir / FILE), url], check=True)
    took = time.perf_counter() - started
    (target_dir / FILE).unlink()
    return took


@dataclass
class Timings:
    """One link's rounds: the pulls, their listings, and curl's copies, in seconds."""

    pulls: list[float] = field(default_factory=list)
    listings: list[float] = field(default_factory=list)
    curls: list[float] = field(default_factory=list)


async def measure(runtime_dir: Path, standin: HubStandin, rounds: int, links: dict[str, float | None]) -> dict[str, Timings]:
    """Pull and curl in turn, `rounds` times at each link rate (None: as fast as loopback goes)."""
    blobs = standin.hf_home / "hub" / ("models--" + INSTRUCT_REPO.replace("/", "--"))
    copies = standin.hf_home / "curl"
    copies.mkdir()
    url = f"{standin.endpoint}/{INSTRUCT_REPO}/resolve/main/{FILE}"
    timings = {name: Timings() for name in links}
    async with Client(runtime_dir, timeout=60) as client:
        await client.subscribe()
        events = client.raw_events()
        await pull_once(client, events)  # warms the daemon up: it imports huggingface_hub's HTTP stack
        shutil.rmtree(blobs)
        for name, rate in links.items():
            standin.throttle(rate)
            for _ in range(rounds):
                listed, took = await pull_once(client, events)
                shutil.rmtree(blobs)
                timings[name].listings.append(listed)
                timings[name].pulls.append(took)
                timings[name].curls.append(curl_once(url, copies))
    return timings


def run(quick: bool = False) -> dict[str, Any]:
    if shutil.which("curl") is None:
        raise RuntimeError("curl is not installed: apt-get install curl")
    rounds = 1 if quick else 7
    root = Path(tempfile.mkdtemp(prefix="vcb-hub-"))
    try:
        repos = make_hub_repos(root / "repos", demo_model())
        size = (repos / INSTRUCT_REPO / FILE).stat().st_size
        with HubStandin(repos) as standin:
            saved = dict(os.environ)
            os.environ.update(standin.env())  # the daemon inherits HF_ENDPOINT and HF_HOME
            try:
                with daemon("--no-load") as bench:
                    timings = asyncio.run(measure(bench.runtime_dir, standin, rounds, {"loopback": None, "1gbit": GIGABIT}))
            finally:
                os.environ.clear()
                os.environ.update(saved)
        hashing = median([hash_once(repos / INSTRUCT_REPO / FILE) for _ in range(rounds)])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result: dict[str, Any] = {
        "name": "hub_pull",
        "settings": {"file": f"{FILE} ({size / 2**20:.1f} MiB)", "rounds": rounds, "load_average_after": loadavg()},
        "sha256_alone_s": hashing,
    }
    targets = []
    for name, timing in timings.items():
        pull_s, curl_s, listing_s = median(timing.pulls), median(timing.curls), median(timing.listings)
        ratio = curl_s / pull_s
        result |= {
            f"{name}_pull_mib_per_s": size / pull_s / 2**20,
            f"{name}_curl_mib_per_s": size / curl_s / 2**20,
            f"{name}_listing_s": listing_s,
            f"{name}_throughput_ratio": ratio,
        }
        targets.append(
            target(
                f"{name}_throughput_ratio",
                f">= {RATIO_TARGET}",
                ratio >= RATIO_TARGET,
                f"a pull took {pull_s * 1000:.0f} ms against curl's {curl_s * 1000:.0f} ms. It also asks for the listing "
                f"({listing_s * 1000:.0f} ms) and hashes every byte: {hashing * 1000:.0f} ms of a core here, in a thread "
                f"of its own that overlaps the transfer only where a core is free, and on {os.cpu_count()} cores the "
                "stand-in, the transfer and the hashing share them",
            )
        )
    return {**result, "targets": targets}
