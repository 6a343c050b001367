"""What each hop of the token path costs generation, measured before choosing a design (issue 15).

The engine's own loop (`DirectModel`: ChatModel, greedy, 2 llama threads on this machine's cores, the engine's
`TokenFrames` coalescing) runs in this process and hands each frame to one of these paths, in a
shuffled order every round so that all of them see the same machine:

- `direct`: nowhere; the frame is only packed.
- `one_hop`: a PUB socket in this process, read by a subscriber process: the engine publishing
  to clients itself.
- `two_hops`: a PAIR socket to a relay process that decodes the frame, numbers it and publishes it
  to the subscriber: the daemon's shape until the engine's channel became a socketpair.
- `two_hops_relay_nice`: the same, with the relay at nice 10: would a lower-priority daemon stay
  out of the llama threads' way?
- `two_hops_pipe`: the relay reads the frames from a pipe instead of ZeroMQ, so the engine wakes
  no I/O thread of its own and the relay one fewer: is ZeroMQ the cost? (The daemon's shape now,
  daemon/engine_channel.py.)

The subscriber reads its SUB socket as `Client` does (a descriptor callback on an asyncio loop,
`protocol.decode_event`); the relay publishes with `protocol.Event`, as the daemon's bus does.
The figure for each path is the paired median, over rounds, of its tok/s over the direct tok/s
of the same round; also its helper processes' CPU time per token. Informational: no target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import mkdtemp
from typing import Any, cast

import msgpack
import zmq

from benchmarks.common import PROMPT, DirectModel, cpu_seconds, demo_model, loadavg, median, rate
from vramchat.daemon.llama.engine import TokenFrames
from vramchat.shared import protocol

Send = Callable[[dict[str, Any]], None]


def _helper(*args: str, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.token_hops", *args], **popen)


def subscriber(endpoint: str) -> None:
    """A client's side of the last hop: every event read and decoded as `Client` does it."""
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)

    def read() -> None:
        while cast(int, socket.get(zmq.EVENTS)) & zmq.POLLIN:
            protocol.decode_event(socket.recv_multipart(zmq.NOBLOCK))

    loop = asyncio.new_event_loop()
    loop.add_reader(socket.FD, read)
    loop.run_forever()


def relay(source: str, endpoint: str, nice: int) -> None:
    """The daemon's side of the middle hop: decode the engine's frame, number it, publish it."""
    os.nice(nice)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.bind(endpoint)
    seq = 0

    def publish(frame: bytes) -> None:
        nonlocal seq
        seq += 1
        pub.send_multipart(protocol.Event("tok", "bench", seq, msgpack.unpackb(frame, raw=False)).frames())

    loop = asyncio.new_event_loop()
    if source.startswith("fd:"):  # length-prefixed frames on a pipe
        fd, pending = int(source[3:]), bytearray()

        def read_pipe() -> None:
            pending.extend(os.read(fd, 1 << 16))
            while len(pending) >= 4 and len(pending) >= 4 + (size := int.from_bytes(pending[:4], "little")):
                publish(bytes(pending[4 : 4 + size]))
                del pending[: 4 + size]

        loop.add_reader(fd, read_pipe)
    else:
        pair = context.socket(zmq.PAIR)
        pair.bind(source)

        def read_pair() -> None:
            while cast(int, pair.get(zmq.EVENTS)) & zmq.POLLIN:
                publish(pair.recv(zmq.NOBLOCK))

        loop.add_reader(pair.FD, read_pair)
    loop.run_forever()


class Paths:
    """The five paths and the helper processes behind each."""

    def __init__(self, folder: Path) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.processes: dict[str, list[subprocess.Popen[bytes]]] = {"direct": []}
        self.sends: dict[str, Send] = {"direct": lambda frame: None}
        seq = 0
        pub = self.context.socket(zmq.PUB)
        pub.bind(f"ipc://{folder}/one.sock")

        def publish(frame: dict[str, Any]) -> None:
            nonlocal seq
            seq += 1
            pub.send_multipart(protocol.Event("tok", "bench", seq, frame).frames())

        self.sends["one_hop"] = publish
        self.processes["one_hop"] = [_helper("--subscriber", f"ipc://{folder}/one.sock")]
        for name, nice in (("two_hops", 0), ("two_hops_relay_nice", 10)):
            pair = self.context.socket(zmq.PAIR)
            pair.connect(f"ipc://{folder}/{name}-in.sock")
            out = f"ipc://{folder}/{name}-out.sock"
            self.processes[name] = [
                _helper("--relay", f"ipc://{folder}/{name}-in.sock", out, str(nice)),
                _helper("--subscriber", out),
            ]
            self.sends[name] = (lambda socket: lambda frame: socket.send(protocol.pack(frame)))(pair)
        read_end, write_end = os.pipe()
        out = f"ipc://{folder}/pipe-out.sock"
        self.processes["two_hops_pipe"] = [
            _helper("--relay", f"fd:{read_end}", out, "0", pass_fds=(read_end,)),
            _helper("--subscriber", out),
        ]
        os.close(read_end)

        def write(frame: dict[str, Any]) -> None:
            data = protocol.pack(frame)
            os.write(write_end, len(data).to_bytes(4, "little") + data)

        self.sends["two_hops_pipe"] = write
        time.sleep(1.0)  # every subscription in place

    def helper_cpu(self, name: str) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes[name])

    def close(self) -> None:
        for process in (p for group in self.processes.values() for p in group):
            process.kill()
            process.wait()


def generate(model: DirectModel, send: Send, max_tokens: int) -> tuple[float, int]:
    """tok/s of one greedy reply, between its first and last token, and the frames it made."""
    frames_sent = 0

    def counted(frame: dict[str, Any]) -> None:
        nonlocal frames_sent
        frames_sent += 1
        send(frame)

    frames = TokenFrames(counted, "bench")
    result = model.generate([{"role": "user", "content": PROMPT}], max_tokens, each=frames.add)
    frames.flush()
    return rate(result["produced"]), frames_sent


def run(quick: bool = False) -> dict[str, Any]:
    rounds, max_tokens = (1, 40) if quick else (15, 200)
    n_threads = os.cpu_count() or 1
    model = DirectModel(str(demo_model()), n_threads=n_threads)
    paths = Paths(Path(mkdtemp(prefix="vcb-hops-")))
    rates: dict[str, list[float]] = {name: [] for name in paths.sends}
    cpu_ms: dict[str, list[float]] = {name: [] for name in paths.sends}
    direct_frames: list[float] = []
    try:
        generate(model, paths.sends["direct"], 16)  # warm up
        for _ in range(rounds):
            order = list(paths.sends)
            random.shuffle(order)
            for name in order:
                before = paths.helper_cpu(name)
                tok_s, sent = generate(model, paths.sends[name], max_tokens)
                cpu_ms[name].append(1000 * (paths.helper_cpu(name) - before) / max_tokens)
                rates[name].append(tok_s)
                if name == "direct":
                    direct_frames.append(sent)
    finally:
        paths.close()
        model.llm.close()
    figures: dict[str, Any] = {"direct_tok_s": median(rates["direct"])}
    for name in paths.sends:
        if name != "direct":
            figures[f"{name}_ratio"] = median([a / b for a, b in zip(rates[name], rates["direct"], strict=True)])
            figures[f"{name}_helper_cpu_ms_per_token"] = median(cpu_ms[name])
    figures["frames_per_reply"] = median(direct_frames)
    return {
        "name": "token path hops",
        "settings": {
            "model": demo_model().name,
            "rounds": rounds,
            "max_tokens": max_tokens,
            "n_threads": n_threads,
            "coalescing": "the engine's TokenFrames",
        },
        **figures,
        "all_direct_tok_s": rates["direct"],
        "load_average_after": loadavg(),
        "targets": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscriber", metavar="ENDPOINT")
    parser.add_argument("--relay", nargs=3, metavar=("SOURCE", "ENDPOINT", "NICE"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.subscriber:
        subscriber(args.subscriber)
    elif args.relay:
        relay(args.relay[0], args.relay[1], int(args.relay[2]))
    else:
        import json

        print(json.dumps(run(quick=args.quick), indent=2, default=str))


if __name__ == "__main__":
    main()
