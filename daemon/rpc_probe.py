"""RPC servers seen from the daemon: whether they answer, and their devices, asked by a short-lived
process (the daemon never links llama.cpp).

An RPC server serves one client at a time, so the probe is only for servers no engine is
connected to (daemon/model_lifecycle.py asks the engine about its own).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from vramchat.shared.rpc_endpoints import unreachable

PROBE_TIMEOUT_S = 30.0


class RpcProbeError(Exception):
    pass


def probe_rpc_devices(endpoint: str) -> list[dict[str, Any]]:
    """Each device of the server at `endpoint` as daemon/llama/rpc.py Device.to_dict() gives it."""
    command = [sys.executable, "-m", "vramchat.daemon.llama.rpc", "--probe", endpoint]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RpcProbeError(
            f"RPC server {endpoint} did not answer within {PROBE_TIMEOUT_S:.0f} s; is another vramchatd or llama.cpp "
            "connected to it? It serves one client at a time"
        ) from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise RpcProbeError(f"could not read the devices of RPC server {endpoint}: {reason}")
    devices: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return devices


async def unanswering_rpc_servers(servers: tuple[str, ...]) -> list[tuple[str, str]]:
    """(endpoint, reason) of each RPC server a plain TCP connect does not reach.

    Before a load: llama.cpp would abort the engine on one, with a less helpful message.
    After a crash: which device went away.
    """
    loop = asyncio.get_running_loop()
    reasons = await asyncio.gather(*(loop.run_in_executor(None, unreachable, server) for server in servers))
    return [(server, reason) for server, reason in zip(servers, reasons, strict=True) if reason]


def rpc_down_text(down: list[tuple[str, str]], devices: list[dict[str, Any]] | None = None, *, stopped: bool = False) -> str:
    """What to tell a person about RPC servers that do not answer, naming their devices."""
    parts = []
    for endpoint, reason in down:
        names = [d["name"] for d in devices or [] if d.get("endpoint") == endpoint]
        device = f"RPC device {', '.join(names)} on {endpoint}" if names else f"RPC server {endpoint}"
        parts.append(f"{device} {'stopped answering' if stopped else 'is not answering'} ({reason})")
    return (
        "; ".join(parts)
        + ". Start `vramchat rpc-server` on that machine (and its SSH tunnel, if it is reached through one), then load "
        'again; or load without it (`"rpc_servers": []` in the load, or leave it out of rpc_servers and --rpc)'
    )
