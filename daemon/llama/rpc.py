"""llama.cpp's RPC backend through ctypes: serve this machine's devices, or use another's.

llama-cpp-python binds none of ggml-rpc, so this loads the libraries its wheel ships. They must
be opened by soname (libggml.so.0), the names llama_cpp itself loaded: the unversioned
libggml.so is a second copy of ggml, with a device registry of its own that llama.cpp never sees.

- `serve` runs an RPC server in this process (blocking, forever): `vramchat rpc-server` execs
  `python -m vramchat.daemon.llama.rpc`, which lands here.
- `register_server` runs in the engine, before the Llama is made: the server's devices join
  ggml's registry (named RPC0, RPC1, ...) and llama.cpp offloads layers, KV cache and compute to
  them as to a local GPU.

Only this module, engine.py and chat_model.py import llama_cpp (tests/test_import_hygiene.py), and
only the engine imports this module: the daemon never loads llama.cpp.

A server that goes away while an engine uses it makes llama.cpp abort the engine; the daemon then
probes the servers (shared/rpc_endpoints.py) and names the one that stopped answering.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Any

from vramchat.shared.rpc_endpoints import DEFAULT_LISTEN, TUNNEL_HINT, EndpointError, is_loopback, parse_endpoint, unreachable
from vramchat.shared.units import format_bytes

# enum ggml_backend_dev_type
DEV_TYPE_NAMES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}
GPU_TYPES = (1, 2)


class RpcError(Exception):
    pass


@dataclass
class Device:
    name: str  # ggml's: "CPU", "CUDA0", "RPC0", ...
    description: str
    type: str  # "CPU", "GPU", "IGPU", "ACCEL"
    memory_free: int
    memory_total: int
    backend: str  # the ggml backend it belongs to: "CPU", "CUDA", "RPC", ...
    endpoint: str | None = None  # the RPC server an RPC device lives on
    # How llama.cpp's load log names an RPC device's buffers: RPC<index on its server>[endpoint],
    # so the second server's first device is RPC1 in the registry but RPC0[host:port2] in the log.
    buffer_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.name} ({self.description}, {format_bytes(self.memory_free)} free of {format_bytes(self.memory_total)})"


class _Libraries:
    """libggml and libggml-rpc from llama_cpp's lib directory, with their signatures set."""

    def __init__(self) -> None:
        import llama_cpp  # loads libggml.so.0 and registers the CPU (and CUDA) devices

        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        try:
            self.ggml = ctypes.CDLL(os.path.join(libdir, "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
            self.rpc = ctypes.CDLL(os.path.join(libdir, "libggml-rpc.so.0"), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise RpcError(
                f"this llama-cpp-python has no RPC backend ({exc}); rebuild it with -DGGML_RPC=ON "
                "(scripts/llama_cmake_args.sh adds it)"
            ) from None
        p, size, cstr = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        size_p = ctypes.POINTER(ctypes.c_size_t)
        for lib, name, restype, argtypes in (
            (self.ggml, "ggml_backend_dev_count", size, []),
            (self.ggml, "ggml_backend_dev_get", p, [size]),
            (self.ggml, "ggml_backend_dev_by_name", p, [cstr]),
            (self.ggml, "ggml_backend_dev_by_type", p, [ctypes.c_int]),
            (self.ggml, "ggml_backend_dev_name", cstr, [p]),
            (self.ggml, "ggml_backend_dev_description", cstr, [p]),
            (self.ggml, "ggml_backend_dev_type", ctypes.c_int, [p]),
            (self.ggml, "ggml_backend_dev_memory", None, [p, size_p, size_p]),
            (self.ggml, "ggml_backend_dev_backend_reg", p, [p]),
            (self.ggml, "ggml_backend_reg_count", size, []),
            (self.ggml, "ggml_backend_reg_get", p, [size]),
            (self.ggml, "ggml_backend_reg_name", cstr, [p]),
            (self.ggml, "ggml_backend_register", None, [p]),
            (self.ggml, "ggml_backend_reg_dev_count", size, [p]),
            (self.ggml, "ggml_backend_reg_dev_get", p, [p, size]),
            (self.rpc, "ggml_backend_rpc_add_server", p, [cstr]),
            (self.rpc, "ggml_backend_rpc_start_server", None, [cstr, cstr, size, size, ctypes.POINTER(p)]),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes

    def device(self, handle: int, endpoint: str | None = None) -> Device:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.ggml.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
        kind = self.ggml.ggml_backend_dev_type(handle)
        return Device(
            name=self.ggml.ggml_backend_dev_name(handle).decode(),
            description=self.ggml.ggml_backend_dev_description(handle).decode(errors="replace"),
            type=DEV_TYPE_NAMES.get(kind, str(kind)),
            memory_free=free.value,
            memory_total=total.value,
            backend=self.ggml.ggml_backend_reg_name(self.ggml.ggml_backend_dev_backend_reg(handle)).decode(),
            endpoint=endpoint,
        )


_libs: _Libraries | None = None


def libraries() -> _Libraries:
    global _libs
    if _libs is None:
        _libs = _Libraries()
    return _libs


def backends() -> list[str]:
    """The names of the backends ggml has registered in this process: "CPU", "CUDA", "RPC", ..."""
    ggml = libraries().ggml
    return [ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode() for i in range(ggml.ggml_backend_reg_count())]


def local_devices() -> list[Device]:
    """Every device ggml has registered in this process (RPC ones included, once registered)."""
    libs = libraries()
    return [libs.device(libs.ggml.ggml_backend_dev_get(i)) for i in range(libs.ggml.ggml_backend_dev_count())]


def _served_devices(names: list[str] | None) -> list[int]:
    """Handles of the devices to serve: those named, else every GPU, else the CPU."""
    libs = libraries()
    if names:
        handles = []
        for name in names:
            handle = libs.ggml.ggml_backend_dev_by_name(name.encode())
            if not handle:
                known = ", ".join(d.name for d in local_devices())
                raise RpcError(f"no device named {name!r} on this machine; it has: {known}")
            handles.append(handle)
        return handles
    every = [libs.ggml.ggml_backend_dev_get(i) for i in range(libs.ggml.ggml_backend_dev_count())]
    gpus = [h for h in every if libs.ggml.ggml_backend_dev_type(h) in GPU_TYPES]
    return gpus or [libs.ggml.ggml_backend_dev_by_type(0)]


def serve(endpoint: str, device_names: list[str] | None = None, n_threads: int | None = None) -> None:
    """Serve devices over llama.cpp's RPC on `endpoint` ("HOST:PORT"); never returns.

    No authentication, no encryption: callers keep `endpoint` on loopback unless told otherwise.
    """
    parse_endpoint(endpoint)
    libs = libraries()
    handles = _served_devices(device_names)
    threads = n_threads or os.cpu_count() or 1
    for handle in handles:
        print(f"vramchat rpc-server: serving {libs.device(handle).describe()}", flush=True)
    print(f"vramchat rpc-server: listening on {endpoint} ({threads} CPU threads); Ctrl-C stops it", flush=True)
    _line_buffer_c_stdout()  # llama.cpp's own lines ("Accepted client connection") as they happen
    # The server blocks in C for good: Python's KeyboardInterrupt would never be raised.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    array = (ctypes.c_void_p * len(handles))(*handles)
    libs.rpc.ggml_backend_rpc_start_server(endpoint.encode(), None, threads, len(handles), array)
    raise RpcError(f"the RPC server on {endpoint} stopped; is the port in use?")


def register_server(endpoint: str) -> list[Device]:
    """Make the devices of the RPC server at `endpoint` usable by the next Llama in this process.

    llama.cpp aborts the process if it cannot connect, so a plain TCP connect comes first, and
    ggml's backtrace (which attaches gdb, for seconds) is turned off: an engine that loses its RPC
    server mid-reply should die at once so that the daemon can say which one went away.
    """
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    if reason := unreachable(endpoint):
        raise RpcError(f"RPC server {endpoint} is not answering ({reason})")
    libs = libraries()
    reg = libs.rpc.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise RpcError(f"RPC server {endpoint} refused the connection (a different llama.cpp RPC version?)")
    libs.ggml.ggml_backend_register(reg)
    devices = []
    for i in range(libs.ggml.ggml_backend_reg_dev_count(reg)):
        device = libs.device(libs.ggml.ggml_backend_reg_dev_get(reg, i), endpoint)
        device.buffer_name = f"RPC{i}[{endpoint}]"
        devices.append(device)
    return devices


def _line_buffer_c_stdout() -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.setvbuf(ctypes.c_void_p.in_dll(libc, "stdout"), None, 1, 0)  # _IOLBF
    except (OSError, ValueError, AttributeError):
        pass


def check_listen(listen: str, insecure_remote: bool) -> str | None:
    """Why `listen` may not be served (None when it may): only loopback, unless insecure_remote."""
    try:
        host, _ = parse_endpoint(listen)
    except EndpointError as exc:
        return str(exc)
    if is_loopback(host) or insecure_remote:
        return None
    return (
        f"{listen} is not a loopback address, and llama.cpp's RPC has no authentication or encryption: anyone who "
        f"reaches the port can use the device and read what is sent to it. Keep the default ({DEFAULT_LISTEN}) and "
        f"reach it over SSH from the machine that runs vramchatd (`{TUNNEL_HINT}`), or pass --insecure-remote"
    )


INSECURE_WARNING = (
    "WARNING: serving llama.cpp RPC on a non-loopback address WITHOUT authentication or encryption: anyone who "
    "reaches {listen} can run work on these devices and read the model and the activations sent to them"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vramchat.daemon.llama.rpc", description="serve this machine's devices over llama.cpp RPC"
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT")
    parser.add_argument("--device", action="append", metavar="NAME", help="a ggml device name (repeatable)")
    parser.add_argument("--threads", type=int, metavar="N")
    parser.add_argument("--insecure-remote", action="store_true")
    parser.add_argument("--list-devices", action="store_true", help="print this machine's devices and exit")
    parser.add_argument("--probe", metavar="HOST:PORT", help="print the devices of that RPC server as JSON, and exit")
    args = parser.parse_args(argv)
    try:
        if args.probe:
            print(json.dumps([device.to_dict() for device in register_server(args.probe)]))
            return 0
        if args.list_devices:
            for device in local_devices():
                print(f"{device.type:5} {device.describe()}")
            return 0
        if reason := check_listen(args.listen, args.insecure_remote):
            print(f"vramchat rpc-server: {reason}", file=sys.stderr)
            return 2
        if args.threads is not None and args.threads < 1:
            print("vramchat rpc-server: --threads must be at least 1", file=sys.stderr)
            return 2
        if not is_loopback(parse_endpoint(args.listen)[0]):
            print(INSECURE_WARNING.format(listen=args.listen), file=sys.stderr, flush=True)
        serve(args.listen, args.device, args.threads)
    except RpcError as exc:
        print(f"vramchat rpc-server: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
