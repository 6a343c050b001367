"""Prometheus metrics for `GET /metrics` on the HTTP listener (daemon/http_api.py).

Two kinds of series, in one private registry (the global one would mix in whatever else the
process imports, and tests start several daemons' worth of objects in one interpreter):

- what counts over time (requests by outcome, tokens, time to first token) lives in real
  Counter and Histogram objects, fed by `observe_reply` whenever the queue finishes a job;
- what the daemon already knows (memory per device, RAM, swap, the engine's RSS, the model's
  plan and split, the queue) is read at scrape time by `_StateCollector`, from the same state
  that `vramchat status` reports, so the two always agree.

Names follow Prometheus' conventions: the `vramchat_` prefix, base units (`_bytes`, `_seconds`)
and `_total` on counters. docs/protocol.md, "HTTP API", lists them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, get_args

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from vramchat.daemon.generation import GenerationQueue
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.daemon.model_state import ModelStateName
from vramchat.daemon.monitor import devices_view
from vramchat.daemon.telemetry import TelemetrySampler
from vramchat.shared import __version__
from vramchat.shared.protocol import PROTOCOL_VERSION

log = logging.getLogger(__name__)

# No `_created` gauge beside every counter: the text format does not need them, and they double
# the series. Process-wide, and the daemon is the only user of prometheus_client in its process.
disable_created_metrics()

PREFIX = "vramchat"
# How a reply ends: JobResult.status, as the stored message says.
OUTCOMES = ("complete", "cancelled", "error", "interrupted")
MODEL_STATES: tuple[str, ...] = get_args(ModelStateName)
# The planner's terms on each device (shared/planner.py Side).
PLAN_TERMS = ("weights", "kv", "compute", "output", "overhead")
# The CPU side as the kernel counts it (shared/planner.py RamTerms).
RAM_TERMS = ("anonymous", "mapped_read", "mapped_cache")
# From a small model's first token on a warm cache (tens of ms) to a long prompt on the CPU (minutes).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))


class DaemonMetrics:
    """The daemon's registry: counters fed by finished replies, and a collector of its live state."""

    def __init__(
        self, *, model: ModelLifecycle, generation: GenerationQueue, sampler: TelemetrySampler, started_at: float
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}_requests", "Replies finished, by how they ended", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:  # every outcome from the start: a rate() over a missing series is empty
            self.requests.labels(outcome)
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated, over every finished reply", registry=self.registry
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of every finished reply, cached ones included", registry=self.registry
        )
        self.prompt_cached_tokens = Counter(
            f"{PREFIX}_prompt_cached_tokens",
            "Prompt tokens the KV state cache spared from evaluation",
            registry=self.registry,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From the engine taking a reply to its first token (prompt evaluation included)",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(model, generation, sampler, started_at))
        # The daemon's own CPU time, RSS and open files: a service left running should show a leak.
        ProcessCollector(namespace=PREFIX, registry=self.registry)

    def observe_reply(self, status: str, stats: dict[str, Any] | None) -> None:
        """Count one finished job. Called by the generation worker: it never raises, so that a
        metrics bug cannot take a reply, or the queue, down with it."""
        try:
            self.requests.labels(status if status in OUTCOMES else "error").inc()
            if not stats:
                return
            self.generated_tokens.inc(_count(stats.get("generated_tokens")))
            self.prompt_tokens.inc(_count(stats.get("prompt_tokens")))
            self.prompt_cached_tokens.inc(_count(stats.get("prompt_cached_tokens")))
            if isinstance(stats.get("ttft_s"), int | float):
                self.ttft.observe(stats["ttft_s"])
        except Exception:
            log.exception("metrics: counting a finished reply failed")

    def render(self) -> bytes:
        """The text exposition format (serve it as prometheus_client.CONTENT_TYPE_LATEST)."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the daemon's state at scrape time: the sampler's latest sample, the model
    state (its plan and split) and the queue. Absent figures give absent series, never zeros."""

    def __init__(self, model: ModelLifecycle, generation: GenerationQueue, sampler: TelemetrySampler, started_at: float) -> None:
        self.model, self.generation, self.sampler, self.started_at = model, generation, sampler, started_at

    def describe(self) -> list[Metric]:
        return []  # the series depend on the state; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from self._daemon()
        yield from self._queue()
        yield from self._model()
        sample = self.sampler.latest()
        if sample is not None:
            yield from self._devices(sample)
            yield from self._host(sample)
            yield from self._engine(sample)
        yield from self._swap_io()

    def _daemon(self) -> Iterator[Metric]:
        yield InfoMetricFamily(
            f"{PREFIX}_build", "The daemon's version", {"version": __version__, "protocol": str(PROTOCOL_VERSION)}
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_uptime_seconds", "Seconds since the daemon started", value=time.time() - self.started_at
        )

    def _queue(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            f"{PREFIX}_queue_requests", "Requests waiting in the queue, and running (0 or 1)", labels=["state"]
        )
        queue.add_metric(["waiting"], len(self.generation.pending))
        queue.add_metric(["running"], 1 if self.generation.in_flight else 0)
        yield queue
        last = self.generation.last_stats or {}
        for key, name, text in (
            ("tokens_per_s", "generation_tokens_per_second", "Generation speed of the latest finished reply"),
            ("prompt_tokens_per_s", "prompt_tokens_per_second", "Prompt evaluation speed of the latest finished reply"),
            ("ttft_s", "last_time_to_first_token_seconds", "Time to first token of the latest finished reply"),
        ):
            if isinstance(last.get(key), int | float):
                yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=last[key])

    def _model(self) -> Iterator[Metric]:
        state = self.model.state
        states = GaugeMetricFamily(f"{PREFIX}_model_state", "1 for the model's current state, 0 for the others", labels=["state"])
        for name in dict.fromkeys((*MODEL_STATES, state.state)):
            states.add_metric([name], 1 if state.state == name else 0)
        yield states
        info = {"name": state.name or "", "state": state.state}
        info |= {k: str(v) for k, v in (("n_gpu_layers", state.n_gpu_layers), ("n_ctx", state.n_ctx)) if v is not None}
        yield InfoMetricFamily(f"{PREFIX}_model", "The model the daemon holds or loads, and its state", info)
        if state.load_seconds is not None:
            yield GaugeMetricFamily(f"{PREFIX}_model_load_seconds", "How long the model's load took", value=state.load_seconds)
        if state.state_cache_bytes is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_state_cache_bytes", "KV states of recent conversations the engine keeps", value=state.state_cache_bytes
            )
        yield from _predicted(state.plan)
        yield from _allocated(state.split)

    def _devices(self, sample: dict[str, Any]) -> Iterator[Metric]:
        devices = sample.get("devices")
        if devices is None:  # the monitor adds them just after sampling
            engine = self.model.engine
            devices = devices_view(sample, self.model.state, engine.devices if engine else None)
        labels = ["device", "kind"]
        total = GaugeMetricFamily(f"{PREFIX}_device_memory_total_bytes", "Memory of each GPU and RPC device", labels=labels)
        used = GaugeMetricFamily(f"{PREFIX}_device_memory_used_bytes", "Memory in use on each GPU and RPC device", labels=labels)
        for device in devices:
            if device.get("kind") == "CPU":  # host RAM: vramchat_ram_*
                continue
            key = [str(device["name"]), str(device.get("kind"))]
            if device.get("memory_total") is not None:
                total.add_metric(key, device["memory_total"])
                if device.get("memory_free") is not None:
                    used.add_metric(key, device["memory_total"] - device["memory_free"])
        yield total
        yield used

    def _host(self, sample: dict[str, Any]) -> Iterator[Metric]:
        host = sample.get("host") or {}
        for key, name, text in (
            ("ram_total", "ram_total_bytes", "Host RAM"),
            ("ram_used", "ram_used_bytes", "Host RAM in use (psutil's used: neither free nor cache)"),
            ("ram_available", "ram_available_bytes", "Host RAM available without swapping"),
            ("page_cache", "page_cache_bytes", "Page cache and buffers, the model's mapped pages included"),
            ("swap_total", "swap_total_bytes", "Swap space"),
            ("swap_used", "swap_used_bytes", "Swap in use"),
        ):
            if host.get(key) is not None:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=host[key])

    def _engine(self, sample: dict[str, Any]) -> Iterator[Metric]:
        engine = sample.get("engine")
        if not engine:
            return
        rss = GaugeMetricFamily(
            f"{PREFIX}_engine_resident_bytes",
            "The engine process's resident memory: anonymous (RssAnon) and file-backed (RssFile)",
            labels=["memory"],
        )
        for key, label in (("anon_resident", "anonymous"), ("file_resident", "file")):
            if engine.get(key) is not None:
                rss.add_metric([label], engine[key])
        yield rss
        if engine.get("model_file_resident") is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_engine_model_file_resident_bytes",
                "The resident pages of the mapped .gguf file, part of the file-backed RSS",
                value=engine["model_file_resident"],
            )

    def _swap_io(self) -> Iterator[Metric]:
        """psutil's cumulative sin/sout, read now: a counter Prometheus can rate() itself."""
        try:
            swap = psutil.swap_memory()
        except Exception:
            return
        yield CounterMetricFamily(f"{PREFIX}_swap_in_bytes", "Bytes read back from swap since boot", value=swap.sin)
        yield CounterMetricFamily(f"{PREFIX}_swap_out_bytes", "Bytes written to swap since boot", value=swap.sout)


def _predicted(plan: dict[str, Any] | None) -> Iterator[Metric]:
    """The planner's prediction: each term on the CPU side and on each offload device."""
    prediction = (plan or {}).get("prediction")
    if not prediction:
        return
    family = GaugeMetricFamily(
        f"{PREFIX}_model_predicted_bytes", "What the planner predicted, by device and term", labels=["device", "term"]
    )
    sides = [("CPU", prediction.get("cpu") or {})]
    # An offload device the plan gives nothing is left out: without a GPU, the planner counts on
    # a stand-in CUDA0 (shared/planner.py SOME_GPU), which is no device of this machine.
    sides += [(str(d["name"]), d) for d in prediction.get("devices") or [] if any(d.get(t) for t in PLAN_TERMS)]
    for device, side in sides:
        for term in PLAN_TERMS:
            if side.get(term) is not None:
                family.add_metric([device, term], side[term])
    yield family
    ram = prediction.get("ram")
    if ram:
        terms = GaugeMetricFamily(
            f"{PREFIX}_model_predicted_ram_bytes",
            "The CPU side as the kernel counts it: anonymous, mapped and read per token, mapped page cache",
            labels=["term"],
        )
        for term in RAM_TERMS:
            if ram.get(term) is not None:
                terms.add_metric([term], ram[term])
        yield terms


def _allocated(split: dict[str, Any] | None) -> Iterator[Metric]:
    """What llama.cpp logged it allocated, by its own buffer and device names (model, kv, compute,
    output; CPU, CPU_Mapped, CUDA0, RPC0[host:port], ...)."""
    buffers = (split or {}).get("buffers")
    if not buffers:
        return
    sums: dict[tuple[str, str], int] = {}
    for buffer in buffers:
        key = (str(buffer["device"]), str(buffer["kind"]))
        sums[key] = sums.get(key, 0) + int(buffer["bytes"])
    family = GaugeMetricFamily(
        f"{PREFIX}_model_allocated_bytes", "What llama.cpp allocated at load, by device and buffer", labels=["device", "term"]
    )
    for (device, term), size in sorted(sums.items()):
        family.add_metric([device, term], size)
    yield family


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0
