"""GET /metrics on the HTTP listener: Prometheus' text format, read back with prometheus_client's own
parser, and every figure checked against what `status` reports at the same time (issue 23)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from http_daemon import HttpDaemon, model_ready, start_http_daemon
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from vramchat.daemon.jobs import Job, JobResult
from vramchat.daemon.metrics import DaemonMetrics
from vramchat.shared.client import Client

from helpers import DaemonFactory, DaemonProcess, RpcServer, until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PLAN_TERMS = ("weights", "kv", "compute", "output", "overhead")
# The tiny model never emits end-of-generation under greedy decoding: each reply is max_tokens long.
REPLY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0.0, "seed": 1}


def scrape(served: HttpDaemon) -> Samples:
    status, content_type, body = served.get("/metrics")
    assert status == 200, body
    assert content_type == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def by_device_and_term(samples: Samples, name: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["device"], dict(labels)["term"]): v for labels, v in series(samples, name).items()}


def complete_replies(served: HttpDaemon, count: int) -> list[dict[str, Any]]:
    """`count` completions, one after the other; their usage."""
    usages = []
    for _ in range(count):
        status, body = served.post("/v1/chat/completions", json.dumps(REPLY).encode())
        assert status == 200, body
        usages.append(body["usage"])
    return usages


async def status_with_engine_sample(served: HttpDaemon) -> dict[str, Any]:
    """`status` once the latest telemetry sample has read the engine process."""

    async def sampled() -> dict[str, Any] | None:
        report: dict[str, Any] = await client.request("status")
        return report if ((report["telemetry"] or {}).get("engine") or {}).get("anon_resident") else None

    async with Client(served.daemon.runtime_dir) as client:
        return await until(sampled, timeout=30, what="a telemetry sample with the engine's memory")


def assert_memory_matches(samples: Samples, status: dict[str, Any]) -> None:
    """The host, the devices, and the model's plan and split, as `status` has them."""
    telemetry, model = status["telemetry"], status["model"]
    host = telemetry["host"]
    assert value(samples, "vramchat_ram_total_bytes") == host["ram_total"]
    assert value(samples, "vramchat_swap_total_bytes") == host["swap_total"]
    assert value(samples, "vramchat_swap_in_bytes_total") >= 0 and value(samples, "vramchat_swap_out_bytes_total") >= 0
    assert value(samples, "vramchat_engine_resident_bytes", memory="anonymous") > 0
    assert value(samples, "vramchat_engine_resident_bytes", memory="file") > 0

    offload = {(d["name"], d["kind"]): d for d in telemetry["devices"] if d["kind"] != "CPU"}
    totals = series(samples, "vramchat_device_memory_total_bytes")
    assert {(dict(labels)["device"], dict(labels)["kind"]): v for labels, v in totals.items()} == {
        key: d["memory_total"] for key, d in offload.items()
    }
    for (name, kind), device in offload.items():
        assert 0 <= value(samples, "vramchat_device_memory_used_bytes", device=name, kind=kind) <= device["memory_total"]

    prediction = model["plan"]["prediction"]
    # Without a GPU, the planner's stand-in CUDA0 holds nothing and has no series.
    sides = [("CPU", prediction["cpu"])] + [(d["name"], d) for d in prediction["devices"] if d["total"]]
    predicted = {(device, term): side[term] for device, side in sides for term in PLAN_TERMS}
    assert by_device_and_term(samples, "vramchat_model_predicted_bytes") == predicted
    allocated: dict[tuple[str, str], int] = {}
    for buffer in model["split"]["buffers"]:
        key = (buffer["device"], buffer["kind"])
        allocated[key] = allocated.get(key, 0) + buffer["bytes"]
    assert allocated and by_device_and_term(samples, "vramchat_model_allocated_bytes") == allocated


async def test_metrics_match_status_after_real_completions(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    served = start_http_daemon(daemon_factory, "--model", str(models_dir / "tiny.gguf"))
    await model_ready(served)
    usages = complete_replies(served, 2)
    status = await status_with_engine_sample(served)
    samples = scrape(served)

    assert_memory_matches(samples, status)
    model = status["model"]
    assert value(samples, "vramchat_model_load_seconds") == pytest.approx(model["load_seconds"], rel=1e-9)
    assert value(samples, "vramchat_model_state", state="ready") == 1
    assert sum(series(samples, "vramchat_model_state").values()) == 1
    info = next(dict(labels) for labels in series(samples, "vramchat_model_info"))
    assert (info["name"], info["state"], info["n_ctx"]) == (model["name"], "ready", str(model["n_ctx"]))

    # Every reply was counted, by outcome and by its tokens, before its answer came back.
    assert {dict(labels)["outcome"]: v for labels, v in series(samples, "vramchat_requests_total").items()} == {
        "complete": 2, "cancelled": 0, "error": 0, "interrupted": 0,
    }  # fmt: skip
    assert value(samples, "vramchat_generated_tokens_total") == sum(u["completion_tokens"] for u in usages) == 16
    assert value(samples, "vramchat_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert value(samples, "vramchat_time_to_first_token_seconds_count") == 2
    assert value(samples, "vramchat_time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert value(samples, "vramchat_generation_tokens_per_second") > 0
    assert value(samples, "vramchat_prompt_tokens_per_second") > 0
    assert value(samples, "vramchat_last_time_to_first_token_seconds") > 0

    assert value(samples, "vramchat_queue_requests", state="waiting") == 0
    assert value(samples, "vramchat_queue_requests", state="running") == 0
    assert status["queue"] == {"running": None, "pending": []}
    assert 0 < value(samples, "vramchat_uptime_seconds") < status["daemon"]["uptime_s"] + 60
    assert [dict(labels)["version"] for labels in series(samples, "vramchat_build_info")] == [status["daemon"]["version"]]
    assert value(samples, "vramchat_process_resident_memory_bytes") > 0  # the daemon's own


async def test_metrics_need_the_key(daemon_factory: DaemonFactory, models_dir: Path) -> None:
    served = start_http_daemon(daemon_factory, "--no-load")
    for key in ("", "wrong"):
        status, content_type, body = served.get("/metrics", key=key)
        assert status == 401 and content_type.startswith("application/json"), body
        assert b"vramchat_" not in body
    samples = scrape(served)  # no model: the series of what is not there are absent, not zero
    assert value(samples, "vramchat_model_state", state="idle") == 1
    assert not series(samples, "vramchat_model_predicted_bytes") and not series(samples, "vramchat_model_load_seconds")
    assert value(samples, "vramchat_requests_total", outcome="complete") == 0


async def test_an_rpc_device_has_its_memory_and_the_models_bytes_on_it(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, models_dir: Path
) -> None:
    server = rpc_server_factory("--device", "CPU", "--threads", "1")

    def factory(*args: str, **options: Any) -> DaemonProcess:  # a local GPU hidden: the RPC device is the only offload device
        daemon = daemon_factory(*args, "--rpc", server.endpoint, "--gpu-layers", "3", **options, start=False)
        daemon.env["CUDA_VISIBLE_DEVICES"] = ""
        return daemon.start()

    served = start_http_daemon(factory, "--model", str(models_dir / "tiny.gguf"))
    await model_ready(served)
    complete_replies(served, 1)
    status = await status_with_engine_sample(served)
    samples = scrape(served)

    assert_memory_matches(samples, status)
    assert value(samples, "vramchat_device_memory_total_bytes", device="RPC0", kind="RPC") > 0
    assert value(samples, "vramchat_model_predicted_bytes", device="RPC0", term="weights") > 0
    assert value(samples, "vramchat_model_allocated_bytes", device=f"RPC0[{server.endpoint}]", term="model") > 0


def test_a_job_is_counted_once_however_it_ends_and_bad_stats_never_raise() -> None:
    """Unit level: the hook a queued job carries fires once, and odd stats count what they can."""
    state = SimpleNamespace(state="idle", name=None, n_gpu_layers=None, n_ctx=None, load_seconds=None, state_cache_bytes=None)
    state.plan = state.split = None
    model = SimpleNamespace(state=state, engine=None)
    generation = SimpleNamespace(pending=[], in_flight=None, last_stats=None)
    sampler = SimpleNamespace(latest=lambda: None)
    metrics = DaemonMetrics(model=model, generation=generation, sampler=sampler, started_at=0.0)  # type: ignore[arg-type]
    job = Job("r1", None, b"c", {}, on_finished=lambda result: metrics.observe_reply(result.status, result.stats))
    job.finish(JobResult("cancelled", error="cancelled by a client"))
    job.finish(JobResult("error", error="a second end is not a second reply"))
    metrics.observe_reply("interrupted", {"generated_tokens": "many", "ttft_s": None, "prompt_tokens": -3})
    metrics.observe_reply("something new", None)  # counted as an error rather than lost
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    outcomes = {dict(labels)["outcome"]: v for labels, v in series(samples, "vramchat_requests_total").items()}
    assert outcomes == {"complete": 0, "cancelled": 1, "error": 1, "interrupted": 1}
    assert value(samples, "vramchat_generated_tokens_total") == 0
    assert value(samples, "vramchat_time_to_first_token_seconds_count") == 0
    assert not any(name.endswith("_created") for name, _ in samples)
