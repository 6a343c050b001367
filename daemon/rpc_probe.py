"""The devices of an RPC server, asked by a short-lived process: the daemon never links llama.cpp.

An RPC server serves one client at a time, so this is only for servers no engine is connected
to (daemon/model_lifecycle.py asks the engine about its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

PROBE_TIMEOUT_S = 30.0


class RpcProbeError(Exception):
    pass


def probe_rpc_devices(endpoint: str) -> list[dict[str, Any]]:
    """Each device of the server at `endpoint` as daemon/rpc.py Device.to_dict() gives it."""
    command = [sys.executable, "-m", "vramchat.daemon.rpc", "--probe", endpoint]
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
