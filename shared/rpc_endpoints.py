"""llama.cpp RPC endpoints ("HOST:PORT"): parsing, the loopback rule, and a reachability probe.

An RPC server (`vramchat rpc-server`, daemon/llama/rpc.py) lends a machine's devices to an engine on
another machine. llama.cpp's RPC protocol has no authentication and no encryption: whoever
reaches the port can run graphs on the device and read every tensor sent to it. So a server
listens on loopback unless told otherwise, and the way to reach one on another machine is an
SSH tunnel (`ssh -N -L 50052:127.0.0.1:50052 gpu-box`).

Pure: no llama_cpp here, so the daemon and the TUI can use it.
"""

from __future__ import annotations

import ipaddress
import socket

DEFAULT_PORT = 50052
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
TUNNEL_HINT = f"ssh -N -L {DEFAULT_PORT}:127.0.0.1:{DEFAULT_PORT} gpu-box"


class EndpointError(ValueError):
    pass


def parse_endpoint(text: str) -> tuple[str, int]:
    """("host", port) from "HOST:PORT", as llama.cpp's RPC takes it (no IPv6 literals)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or ":" in host or any(c.isspace() for c in text):
        raise EndpointError(f'an RPC endpoint looks like "HOST:PORT", e.g. "{DEFAULT_LISTEN}", not {text!r}')
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise EndpointError(f"the port of RPC endpoint {text!r} must be a number from 1 to 65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why a plain TCP connect to `endpoint` fails ("connection refused", ...); None if it connects.

    An RPC server serves one client at a time, but the kernel completes the connection from the
    listen backlog, so a server busy with another engine still answers this.
    """
    try:
        host, port = parse_endpoint(endpoint)
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except EndpointError as exc:
        return str(exc)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror as exc:
        return f"cannot resolve the host: {exc.strerror}"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
