"""A short scheduler slice for the processes that relay and show tokens, not for the engine.

While a reply is generated the engine's llama threads run on every core. Linux's EEVDF scheduler
(6.6 and later) lets a running task finish its slice, 1.4 ms on a 2-core VM, before a task that
just woke gets the core; since 6.12 a task may ask for a shorter slice, and one whose slice is
shorter than the running task's takes the core when it wakes: the same CPU time, spent at once.
Measured there with a 0.1 ms slice in the daemon and the client, against the default: the first
token of a reply asked for after a pause reached the client 0.79 to 0.82 ms after the engine made
it instead of 3.5 to 4.3 ms (medians of 15 requests, two runs each); while a reply streams, the
p99 of the relay (a frame's last token) fell from 4.1-4.3 to 2.7-3.1 ms; tok/s did not move
(docs/benchmarks.md, issue 15).

The setting is per thread and inherited by threads and processes started afterwards, so a process
asks before it starts any, and the engine, a child of the daemon, asks for the default back.
Where the call is missing (another OS or architecture, a seccomp filter) nothing changes; a kernel
before 6.12 accepts it and ignores the slice.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

SHORT_SLICE_NS = 100_000  # the shortest the kernel allows
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())


class _SchedAttr(ctypes.Structure):
    """`struct sched_attr` of sched_setattr(2), as of Linux 4.16."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),  # for SCHED_OTHER: the slice, 0 for the default
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


def _set_slice(slice_ns: int) -> bool:
    """Set the calling thread's slice under SCHED_OTHER, keeping its nice value; False if refused."""
    if _SCHED_SETATTR is None or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False
    attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_nice=os.getpriority(os.PRIO_PROCESS, 0), sched_runtime=slice_ns)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SCHED_SETATTR, 0, ctypes.byref(attr), 0) != 0:
        log.debug("sched_setattr refused a %d ns slice: %s", slice_ns, os.strerror(ctypes.get_errno()))
        return False
    return True


def use_short_slice() -> bool:
    """For a process that wakes for every frame of tokens and does little each time."""
    return _set_slice(SHORT_SLICE_NS)


def use_default_slice() -> bool:
    """For the engine, whose llama threads should run their slices out."""
    return _set_slice(0)
