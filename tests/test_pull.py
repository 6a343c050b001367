"""`vramchat pull REPO[:QUANT]`: the daemon downloads from the Hub stand-in into the hub cache.

Real daemons, the stand-in on loopback (tests/hub_standin.py) serving real quantizations of the
demo model. Where a test needs a download still under way at some step, the stand-in is
throttled: a slower machine only makes it last longer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vramchat.shared.client import Client, RequestFailed

from helpers import DaemonFactory, DaemonProcess, until, wait_ready, wait_until
from hub_repos import GATED_REPO, GATED_TOKEN, INSTRUCT_REPO
from hub_standin import HubStandin, sha256_of

Q2_K = "SmolLM2-135M-Instruct-Q2_K.gguf"
Q8_0 = "SmolLM2-135M-Instruct-Q8_0.gguf"
MiB = 1 << 20


def cache_dir(standin: HubStandin) -> Path:
    return standin.hf_home / "hub"


def repo_dir(standin: HubStandin, repo: str = INSTRUCT_REPO) -> Path:
    return cache_dir(standin) / ("models--" + repo.replace("/", "--"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def download_of(client: Client, download_id: str) -> dict[str, Any]:
    views = (await client.request("status"))["downloads"]
    return next(v for v in views if v["id"] == download_id)


async def ended(client: Client, download_id: str, timeout: float = 120) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        view = await download_of(client, download_id)
        return view if view["state"] in ("complete", "error", "cancelled") else None

    return await until(done, timeout=timeout, what=f"download {download_id} ends", interval=0.1)


async def moving(client: Client, download_id: str, at_least: int) -> dict[str, Any]:
    """The download's view once it has `at_least` bytes on disk."""

    async def far_enough() -> dict[str, Any] | None:
        view = await download_of(client, download_id)
        assert view["state"] in ("queued", "downloading", "verifying"), view
        return view if view["done_bytes"] >= at_least else None

    return await until(far_enough, timeout=60, what=f"download {download_id} has {at_least} bytes", interval=0.05)


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, hub_standin: HubStandin) -> DaemonProcess:
    """A daemon without a model, pointed at the stand-in (the fixture set HF_ENDPOINT and HF_HOME)."""
    return daemon_factory("--no-load")


async def test_a_pull_lands_in_the_hub_cache_then_lists_and_loads(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    """A set of 3 shards: blobs named by sha256, snapshot links, refs/main; then `models` and `load`."""
    async with Client(daemon.runtime_dir, timeout=60) as client:
        accepted = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "q4_k_m"})
        assert accepted["position"] == 0 and accepted["download"]["quant"] == "Q4_K_M"
        view = await ended(client, accepted["download"]["id"])
        assert view["state"] == "complete", view
        assert view["done_bytes"] == view["total_bytes"] == sum(f["size_bytes"] for f in view["files"])

        commit = hub_standin.commit(INSTRUCT_REPO)
        folder = repo_dir(hub_standin)
        assert view["revision"] == commit and (folder / "refs" / "main").read_text() == commit
        assert len(view["files"]) == 3
        for file in view["files"]:
            link = folder / "snapshots" / commit / file["path"]
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
            assert link.resolve() == folder / "blobs" / file["sha256"]
            assert sha256(link) == file["sha256"] == sha256_of(hub_standin.root / INSTRUCT_REPO / file["path"])
        assert not list(folder.glob("blobs/*.incomplete"))
        assert view["model_path"] == str(folder / "snapshots" / commit / view["files"][0]["path"])
        assert view["model_path"].endswith("-00001-of-00003.gguf")

        listed = [m for m in (await client.request("models"))["models"] if m["path"] == view["model_path"]]
        assert len(listed) == 1 and listed[0]["size_bytes"] == view["total_bytes"], listed
        await client.request("load", {"model": view["model_path"]}, timeout=120)
        await wait_ready(client)


def test_the_cli_draws_the_progress_and_prints_the_model(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    hub_standin.throttle(30 * MiB)  # 84 MiB: about 3 s at this rate, longer on a slower machine
    result = subprocess.run(
        [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "pull", f"{INSTRUCT_REPO}:Q2_K"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    percents = [int(p) for p in re.findall(r"\] +(\d+)%", result.stderr)]
    assert len(set(percents)) >= 4 and percents == sorted(percents) and percents[-1] == 100, result.stderr
    assert re.search(r"MiB/s +\d+s left", result.stderr), result.stderr
    assert "complete" in result.stderr.split("\r")[-1]
    path = result.stdout.splitlines()[0]
    assert path.endswith(Q2_K) and Path(path).is_symlink()


async def test_a_pull_whose_daemon_is_killed_resumes_from_its_bytes_after_a_restart(
    daemon: DaemonProcess, hub_standin: HubStandin
) -> None:
    size = (hub_standin.root / INSTRUCT_REPO / Q8_0).stat().st_size
    hub_standin.throttle(20 * MiB)  # 138 MiB: about 7 s at this rate; killed after 24 MiB
    async with Client(daemon.runtime_dir) as client:
        accepted = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q8_0"})
        download_id = accepted["download"]["id"]
        await moving(client, download_id, 24 * MiB)
    daemon.stop(signal.SIGKILL)
    partial = next(repo_dir(hub_standin).glob("blobs/*.incomplete"))
    kept = partial.stat().st_size
    assert 0 < kept < size

    hub_standin.throttle(None)
    daemon.start()  # nobody asks again: the daemon resumes what it had queued
    async with Client(daemon.runtime_dir) as client:
        view = await ended(client, download_id)
    assert view["state"] == "complete", view
    served = hub_standin.bytes_served(INSTRUCT_REPO, Q8_0)
    print(f"resume: {kept} bytes kept at the kill; the stand-in served {served} bytes for a file of {size} ({served / size:.3f})")
    assert served <= 1.1 * size
    assert sha256(Path(view["model_path"])) == view["files"][0]["sha256"]
    ranges = [r for method, path, r in hub_standin.requests if method == "GET" and path.endswith(Q8_0)]
    assert len(ranges) == 2 and ranges[1] is not None and int(ranges[1].split("=")[1].rstrip("-")) >= kept - 64 * 1024


async def test_a_file_with_one_wrong_byte_is_refused_and_never_listed(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    hub_standin.corrupt(INSTRUCT_REPO, Q2_K)
    async with Client(daemon.runtime_dir) as client:
        accepted = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q2_K"})
        view = await ended(client, accepted["download"]["id"])
        assert view["state"] == "error" and "sha256" in view["error"] and "removed" in view["error"], view
        assert view["model_path"] is None
        models = (await client.request("models"))["models"]
    folder = repo_dir(hub_standin)
    assert not list(folder.glob("blobs/*")) and not (folder / "snapshots").exists()
    assert not [m for m in models if str(cache_dir(hub_standin)) in m["path"]], models


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 2 MiB tmpfs (the tests run as root, as CI does), unmounted afterwards."""
    mount = Path(tempfile.mkdtemp(prefix="vc-tmpfs-"))
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        mount.rmdir()
    # A failure, not a skip: `make test` runs as root (README), and a skipped test checks nothing.
    assert made.returncode == 0, f"cannot mount a tmpfs: {made.stderr.strip()}; run the tests as root, as CI does"
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
    mount.rmdir()


async def test_a_pull_the_disk_has_no_room_for_is_refused_before_it_starts(
    daemon_factory: DaemonFactory, hub_standin: HubStandin, small_tmpfs: Path
) -> None:
    daemon = daemon_factory("--no-load", start=False)
    daemon.env = {"HF_HUB_CACHE": str(small_tmpfs)}
    daemon.start()
    async with Client(daemon.runtime_dir) as client:
        with pytest.raises(RequestFailed) as refused:
            await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q2_K"})
        assert (await client.request("status"))["downloads"] == []
    message = refused.value.message
    assert refused.value.code == "no_space", message
    assert "84.1 MiB left to fetch" in message and "2.0 MiB free" in message and str(small_tmpfs) in message, message
    assert hub_standin.bytes_served() == 0 and not list(small_tmpfs.iterdir())


async def test_two_pulls_queue_and_complete_in_order(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    hub_standin.throttle(20 * MiB)
    async with Client(daemon.runtime_dir) as client:
        await client.subscribe()
        events = client.raw_events()
        first = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q2_K"})
        second = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q4_K_M"})
        assert (first["position"], second["position"]) == (0, 1)
        again = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q4_K_M"})
        assert again["download"]["id"] == second["download"]["id"] and again["position"] == 1
        hub_standin.throttle(None)
        order: list[tuple[str, str]] = []
        ids = {first["download"]["id"]: "first", second["download"]["id"]: "second"}

        async def watch() -> None:
            async for event in events:
                if event.topic == "download" and event.body["id"] in ids:
                    step = (ids[event.body["id"]], event.body["state"])
                    if not order or order[-1] != step:
                        order.append(step)
                    if step == ("second", "complete"):
                        return

        await asyncio.wait_for(watch(), 120)
    starts = [order.index((which, "downloading")) for which in ("first", "second")]
    assert order.index(("first", "complete")) < starts[1] and starts[0] < starts[1], order


async def test_cancel_stops_a_download_and_removes_its_partial_file(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    hub_standin.throttle(4 * MiB)
    async with Client(daemon.runtime_dir) as client:
        running = (await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q8_0"}))["download"]
        queued = (await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q2_K"}))["download"]
        assert (await client.request("pull.cancel", {"id": queued["id"]}))["download"]["state"] == "cancelled"
        await moving(client, running["id"], 1 * MiB)
        cancelled = (await client.request("pull.cancel", {"id": running["id"]}))["download"]
        assert cancelled["state"] == "cancelled"
        assert (await ended(client, running["id"]))["state"] == "cancelled"
        for download_id, code in ((running["id"], "invalid_value"), ("nope", "not_found")):
            with pytest.raises(RequestFailed) as refused:
                await client.request("pull.cancel", {"id": download_id})
            assert refused.value.code == code
    folder = repo_dir(hub_standin)
    wait_until(lambda: not list(folder.glob("blobs/*")), timeout=30, what="the partial file is removed")
    assert not (folder / "snapshots").exists()
    served = hub_standin.bytes_served()
    time.sleep(1)
    assert hub_standin.bytes_served() - served < MiB  # stopped: it would be 4 MiB more
    assert hub_standin.bytes_served(INSTRUCT_REPO, Q2_K) == 0


def test_ctrl_c_detaches_the_cli_and_the_download_goes_on(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    hub_standin.throttle(8 * MiB)
    command = [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "pull"]
    cli = subprocess.Popen([*command, f"{INSTRUCT_REPO}:Q2_K"], stderr=subprocess.PIPE, text=True)
    assert cli.stderr is not None
    seen = ""
    while "MiB/s" not in seen:  # progress with a rate: the download is under way
        char = cli.stderr.read(1)
        assert char, f"vramchat pull ended early: {seen}"
        seen += char
    cli.send_signal(signal.SIGINT)
    _, rest = cli.communicate(timeout=30)
    assert cli.returncode == 130, seen + rest
    download_id = re.search(r"as download (\w+)", seen).group(1)  # type: ignore[union-attr]
    assert "detached" in rest and f"vramchat pull --cancel {download_id}" in rest, rest

    listed = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    assert re.search(rf"^{download_id} .*MiB/s .*left$", listed, re.M), listed  # still moving
    stopped = subprocess.run([*command, "--cancel", download_id], capture_output=True, text=True, timeout=30, check=True)
    assert f"cancelled download {download_id}" in stopped.stdout


async def test_a_stalled_transfer_is_tried_again_from_where_it_stopped(
    daemon_factory: DaemonFactory, hub_standin: HubStandin
) -> None:
    daemon = daemon_factory("--no-load", start=False)
    daemon.env = {"HF_HUB_DOWNLOAD_TIMEOUT": "1"}  # huggingface_hub's read timeout: a stall after 1 s without a byte
    daemon.start()
    hub_standin.throttle(400)  # a chunk of 1 KiB, then 2.6 s without a byte, again and again
    async with Client(daemon.runtime_dir) as client:
        accepted = await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q2_K"})
        daemon.wait_for_log("trying again", timeout=30)
        hub_standin.throttle(None)
        view = await ended(client, accepted["download"]["id"])
    assert view["state"] == "complete", view
    ranges = [r for method, path, r in hub_standin.requests if method == "GET" and path.endswith(Q2_K)]
    assert len(ranges) >= 2 and ranges[-1] != "bytes=0-", ranges


async def test_a_gated_repo_needs_hf_token(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    async with Client(daemon.runtime_dir) as client:
        accepted = await client.request("pull", {"repo": GATED_REPO, "quant": "Q2_K"})
        view = await ended(client, accepted["download"]["id"])
    assert view["state"] == "error" and "HF_TOKEN" in view["error"] and "401" in view["error"], view
    assert not list(repo_dir(hub_standin, GATED_REPO).glob("blobs/*"))

    daemon.stop()
    daemon.env = {"HF_TOKEN": GATED_TOKEN}
    daemon.start()
    async with Client(daemon.runtime_dir) as client:
        accepted = await client.request("pull", {"repo": GATED_REPO, "quant": "Q2_K"})
        view = await ended(client, accepted["download"]["id"])
    assert view["state"] == "complete", view


async def test_a_pull_without_a_quant_takes_the_one_list_recommends(daemon: DaemonProcess, hub_standin: HubStandin) -> None:
    command = [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "pull", INSTRUCT_REPO]
    listed = subprocess.run([*command, "--list", "--json"], capture_output=True, text=True, timeout=120, check=True)
    recommended = json.loads(listed.stdout)["recommended"]
    assert recommended is not None, listed.stdout
    async with Client(daemon.runtime_dir, timeout=60) as client:
        accepted = await client.request("pull", {"repo": INSTRUCT_REPO})
        assert accepted["download"]["quant"] == recommended
        with pytest.raises(RequestFailed) as refused:
            await client.request("pull", {"repo": INSTRUCT_REPO, "quant": "Q5_K_S"})
        assert refused.value.code == "not_found" and "Q4_K_M" in refused.value.message
        with pytest.raises(RequestFailed) as refused:
            await client.request("pull", {"repo": "not a repo"})
        assert refused.value.code == "invalid_value"
