"""Split GGUFs are one model everywhere, and the Hugging Face cache is a model dir (issue 21).

The demo model split into 3 files by the gguf package's own writer inspects, plans, lists,
loads and answers like the file it came from; a missing, extra or foreign file is refused by
name. A hub cache laid out by hand as huggingface_hub lays it out (blobs, snapshot links,
refs/main) lists its models as ORG/NAME:QUANT, and a daemon loads them from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_rpc import CPU_SERVER, GREEDY, QUESTION, offloading_daemon, report_of

from vramchat.daemon import model_files
from vramchat.shared.client import Client, RequestFailed
from vramchat.shared.gguf import GGUFError, inspect_cached, inspect_gguf
from vramchat.shared.load_plan import Machine, plan_load
from vramchat.shared.planner import PlanSettings
from vramchat.shared.speed import CpuSpeed

from gguf_factory import TinyModelSpec, split_gguf, write_tiny_llama
from helpers import DaemonFactory, RpcServer, chat, collect_reply

GIB, MIB = 1 << 30, 1 << 20
DEMO_SET = "SmolLM2-135M-Instruct-Q4_1.gguf"
CPU_ONLY = Machine(available_ram=64 * GIB, ram_bandwidth=20e9, cpu_speed=CpuSpeed(1e11, 2))
WITH_GPU = Machine(free_vram=8 * GIB, available_ram=64 * GIB, gpu_name="a GPU", ram_bandwidth=20e9, cpu_speed=CpuSpeed(1e11, 2))


@pytest.fixture(scope="session")
def demo_split(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The demo model in 3 files, written once per session."""
    return split_gguf(demo_model, tmp_path_factory.mktemp("split") / DEMO_SET, 3)


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Another model split into 3: its files are foreign to the demo model's set."""
    folder = tmp_path_factory.mktemp("tiny-split")
    return split_gguf(write_tiny_llama(folder / "tiny.gguf"), folder / "Tiny-F32.gguf", 3)


def linked_set(folder: Path, files: list[Path]) -> list[Path]:
    """Hard links to `files` in `folder` (under their names): a set to damage without copying 98 MB."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        os.link(file, folder / file.name)
    return [folder / file.name for file in files]


# --- inspection and the plan ---------------------------------------------------------------------


def test_the_gguf_writer_names_and_numbers_files_as_llama_cpp_does(tiny_split: list[Path]) -> None:
    from gguf import GGUFReader

    assert [p.name for p in tiny_split] == [f"Tiny-F32-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    readers = [GGUFReader(p) for p in tiny_split]
    keys = [{k: r.fields[k].contents() for k in ("split.no", "split.count", "split.tensors.count")} for r in readers]
    assert keys == [{"split.no": n, "split.count": 3, "split.tensors.count": 21} for n in range(3)]  # split.no is 0-based
    assert "general.architecture" in readers[0].fields and "general.architecture" not in readers[1].fields


def test_any_file_of_the_split_demo_model_reads_the_whole_set(demo_model: Path, demo_split: list[Path]) -> None:
    whole = inspect_gguf(demo_model)
    for shard in demo_split:
        info = inspect_gguf(shard)
        assert info.path == str(demo_split[0]) and info.shards == 3 and info.shard_paths == [str(p) for p in demo_split]
        assert info.parameters == whole.parameters == 134_515_008  # not 67M, from the first file alone
        assert info.file_size == sum(p.stat().st_size for p in demo_split)
        assert [(t.name, t.type, t.bytes, t.shape) for t in info.tensors] == [
            (t.name, t.type, t.bytes, t.shape) for t in whole.tensors
        ]
        assert [t.shard for t in info.tensors] == [0] * 91 + [1] * 91 + [2] * 90
        same = ("layer_bytes", "embedding_bytes", "output_bytes", "quantization_mix", "n_vocab", "has_chat_template")
        assert all(getattr(info, name) == getattr(whole, name) for name in same)
    print(
        f"\nunsplit: {whole.parameters:,} parameters, {whole.file_size:,} bytes in 1 file; "
        f"split: {info.parameters:,} parameters, {info.file_size:,} bytes in {info.shards} files"
    )


def test_the_split_demo_model_plans_like_the_unsplit_one(demo_model: Path, demo_split: list[Path]) -> None:
    """Every term is equal with the CPU's weights in one piece: all of them on the CPU, none, or
    the fit. In between, llama.cpp maps each file on its own, so the CPU's mapped span leaves out
    the GPU's tensors between its files: only that span, page cache, is smaller (checked against
    llama.cpp in test_a_partly_offloaded_split_model_maps_each_file_as_predicted)."""
    whole, split = inspect_gguf(demo_model), inspect_gguf(demo_split[1])
    settings = PlanSettings(n_ctx=4096)
    for machine in (CPU_ONLY, WITH_GPU):
        for layers in (0, split.n_layer + 1, "auto"):
            assert plan_load(split, machine, layers, settings).to_dict() == plan_load(whole, machine, layers, settings).to_dict()
    for layers in range(1, split.n_layer + 1):
        ours, theirs = (
            plan_load(split, WITH_GPU, layers, settings).prediction,
            plan_load(whole, WITH_GPU, layers, settings).prediction,
        )
        smaller = theirs.cpu.weights - ours.cpu.weights
        assert 0 <= smaller == theirs.ram.mapped_cache - ours.ram.mapped_cache == theirs.cpu.total - ours.cpu.total
        assert (ours.gpu, ours.cpu.kv, ours.cpu.compute, ours.ram.mapped_read) == (
            theirs.gpu,
            theirs.cpu.kv,
            theirs.cpu.compute,
            theirs.ram.mapped_read,
        )


def test_vramchat_plan_of_any_file_plans_the_set(demo_model: Path, demo_split: list[Path]) -> None:
    def plan(path: Path) -> dict[str, Any]:
        command = [sys.executable, "-m", "vramchat.tui.cli", "plan", str(path), "--vram", "8GiB", "--ram", "64GiB", "--json"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    split, whole = plan(demo_split[2]), plan(demo_model)
    model = split["model"]
    assert (model["parameters"], model["shards"], model["path"]) == (134_515_008, 3, str(demo_split[0]))
    assert split["fit"] == whole["fit"] and split["swap"] == whole["swap"]


def test_a_missing_extra_or_foreign_file_is_refused_by_name(
    demo_split: list[Path], tiny_split: list[Path], tmp_path: Path
) -> None:
    def refused(files: list[Path], named: Path, *words: str) -> None:
        for file in files:
            if file.exists():
                with pytest.raises(GGUFError) as error:
                    inspect_gguf(file)
                assert str(named) in str(error.value) and all(w in str(error.value) for w in words), error.value

    missing = linked_set(tmp_path / "missing", demo_split)
    missing[2].unlink()
    refused(missing, missing[2], "is missing", "file 3 of the 3", "Download it again")

    foreign = linked_set(tmp_path / "foreign", [demo_split[0], demo_split[2]])
    os.link(tiny_split[1], foreign[0].parent / demo_split[1].name)
    refused(foreign, foreign[0].parent / demo_split[1].name, "another model or another split", "21 tensors")

    extra = linked_set(tmp_path / "extra", demo_split)
    os.link(demo_split[2], extra[0].parent / DEMO_SET.replace(".gguf", "-00004-of-00003.gguf"))
    refused(extra, extra[0].parent / DEMO_SET.replace(".gguf", "-00004-of-00003.gguf"), "does not belong", "delete it")

    recount = linked_set(tmp_path / "recount", demo_split)
    os.link(tiny_split[0], recount[0].parent / DEMO_SET.replace(".gguf", "-00001-of-00004.gguf"))
    refused(recount, recount[0].parent / DEMO_SET.replace(".gguf", "-00001-of-00004.gguf"), "does not belong")

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    os.link(demo_split[0], swapped / demo_split[0].name)
    os.link(demo_split[1], swapped / demo_split[2].name)  # file 2 under the name of file 3
    os.link(demo_split[2], swapped / demo_split[1].name)
    refused([swapped / demo_split[0].name], swapped / demo_split[1].name, "says it is file 3 of 3")

    renamed = tmp_path / "model.gguf"
    os.link(demo_split[0], renamed)
    refused([renamed], renamed, "not named like one", "-00001-of-00003.gguf")


def test_the_cached_inspection_sees_a_file_of_the_set_go(demo_split: list[Path], tmp_path: Path) -> None:
    files = linked_set(tmp_path, demo_split)
    assert inspect_cached(files[0]).shards == 3
    files[1].unlink()
    with pytest.raises(GGUFError, match=r"00002-of-00003\.gguf is missing"):
        inspect_cached(files[0])


# --- listing -------------------------------------------------------------------------------------


def test_a_split_set_is_listed_once_at_its_total_size(demo_split: list[Path]) -> None:
    folder = demo_split[0].parent
    listed = [m for m in model_files.discover([folder]) if m["source"] == str(folder)]
    total = sum(p.stat().st_size for p in demo_split)
    assert listed == [{"name": DEMO_SET, "path": str(demo_split[0]), "size_bytes": total, "source": str(folder), "shards": 3}]
    for name in (DEMO_SET, DEMO_SET.removesuffix(".gguf"), demo_split[0].name, str(demo_split[2])):
        assert model_files.resolve(name, [folder], allow_any_path=False) in (demo_split[0], demo_split[2])


def blob_link(repo: Path, commit: str, path_in_repo: str, source: Path | None) -> Path:
    """A file as huggingface_hub caches it: its bytes in blobs/<sha256>, and a relative link to the
    blob at snapshots/<commit>/<path in repo>; None makes a link to a blob that is not there."""
    data = source.read_bytes() if source else path_in_repo.encode()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    if source is not None and not blob.exists():
        shutil.copyfile(source, blob)
    link = repo / "snapshots" / commit / path_in_repo
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_split: list[Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """$HF_HOME/hub with a repo of tiny models, as people publish them: a single file, a quant
    folder of 3 files, one without a quantization in its name; and what is not a model to list:
    a vision projector, an importance matrix, a link whose blob is missing, a download in
    progress, a set with a file still to come. An older revision holds one more quant."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo, main, old = tmp_path / "hf" / "hub" / "models--tinyorg--Tiny-GGUF", "c0ffee" * 6 + "c0ff", "0ld" * 13 + "0"
    q8 = write_tiny_llama(tmp_path / "q8.gguf", TinyModelSpec(quant="Q8_0"))
    links = {"Q8_0": blob_link(repo, main, "Tiny-Q8_0.gguf", q8)}
    for file in tiny_split:
        links[file.name] = blob_link(repo, main, f"Q4_K_M/{file.name.replace('F32', 'Q4_K_M')}", file)
    links["F32"] = blob_link(repo, main, "tiny.gguf", write_tiny_llama(tmp_path / "f32.gguf", TinyModelSpec(seed=3)))
    blob_link(repo, main, "mmproj-Tiny-F16.gguf", q8)
    blob_link(repo, main, "Tiny.imatrix.gguf", q8)
    blob_link(repo, main, "Tiny-Q2_K.gguf", None)
    blob_link(repo, main, "Q6_K/Tiny-Q6_K-00001-of-00002.gguf", tiny_split[0])
    (repo / "blobs" / "f00d.incomplete").write_bytes(b"GGUF")
    links["Q5_0"] = blob_link(repo, old, "Tiny-Q5_0.gguf", write_tiny_llama(tmp_path / "q5.gguf", TinyModelSpec(seed=5)))
    blob_link(repo, old, "Tiny-Q8_0.gguf", tiny_split[0])  # main's Q8_0 replaced it
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)
    return links


def test_the_hub_cache_lists_models_by_repo_and_quant(hub_cache: dict[str, Path], tiny_split: list[Path]) -> None:
    listed = [m for m in model_files.discover([]) if m["source"] == "hf cache"]
    first = hub_cache[tiny_split[0].name]
    assert [(m["name"], m["path"], m["shards"], m["quant"], m["repo"]) for m in listed] == [
        ("tinyorg/Tiny-GGUF:Q4_K_M", str(first), 3, "Q4_K_M", "tinyorg/Tiny-GGUF"),
        ("tinyorg/Tiny-GGUF:Q8_0", str(hub_cache["Q8_0"]), 1, "Q8_0", "tinyorg/Tiny-GGUF"),
        ("tinyorg/Tiny-GGUF:F32", str(hub_cache["F32"]), 1, "F32", "tinyorg/Tiny-GGUF"),  # from general.file_type
        ("tinyorg/Tiny-GGUF:Q5_0", str(hub_cache["Q5_0"]), 1, "Q5_0", "tinyorg/Tiny-GGUF"),
    ]
    assert listed[0]["size_bytes"] == sum(p.stat().st_size for p in tiny_split)
    # Loadable by name (as -hf spells it, any case) or path, though no model dir holds the cache;
    # a path stays the snapshot's link, which llama.cpp finds the other files of a set beside.
    for name in ("tinyorg/Tiny-GGUF:Q4_K_M", "tinyorg/Tiny-GGUF:q4_k_m", str(first)):
        assert model_files.resolve(name, [], allow_any_path=False) == first
    second = hub_cache[tiny_split[1].name]
    assert model_files.resolve(str(second), [], allow_any_path=False) == second
    assert inspect_gguf(second).path == str(first)


# --- through a real daemon -----------------------------------------------------------------------


async def greedy_reply(client: Client) -> tuple[str, int]:
    """The reply's text and token count, to the question alone in a fresh conversation. Not the
    `tok` frames: how tokens share a frame depends on the machine's speed (daemon/llama/engine.py)."""
    conversation = await client.request("conversation.create", {"system_prompt": "You are a helpful assistant."})
    events = client.raw_events()
    request_id, _ = await chat(client, QUESTION, GREEDY, conversation["conversation"]["id"])
    _, final = await collect_reply(events, request_id)
    assert final is not None and final["status"] == "complete", final
    return final["content"], final["stats"]["generated_tokens"]


async def load(client: Client, model: str, **fields: Any) -> dict[str, Any]:
    reply: dict[str, Any] = (await client.request("load", {"model": model, "n_ctx": 2048, **fields}, timeout=120))["model"]
    return reply


@pytest.mark.demo
async def test_the_split_demo_model_lists_once_loads_and_answers_like_the_unsplit_one(
    daemon_factory: DaemonFactory, demo_model: Path, demo_split: list[Path], tiny_split: list[Path], tmp_path: Path
) -> None:
    folder, damaged_dir = demo_split[0].parent, tmp_path / "damaged"
    damaged_dir.mkdir()
    damaged = [damaged_dir / f"Damaged-Q4_1-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    for source, link in zip((demo_split[0], tiny_split[1], demo_split[2]), damaged, strict=True):
        os.link(source, link)  # file 2 from another model
    daemon = daemon_factory("--no-load", "--models-dir", str(folder), "--models-dir", str(damaged_dir))
    async with Client(daemon.runtime_dir) as client:
        await client.subscribe()
        listed = [m for m in (await client.request("models"))["models"] if m["source"] == str(folder)]
        assert [(m["name"], m["shards"]) for m in listed] == [(DEMO_SET, 3)]
        unsplit = await load(client, str(demo_model))
        expected = await greedy_reply(client)
        split = await load(client, DEMO_SET)
        assert (split["path"], split["name"]) == (str(demo_split[0]), DEMO_SET)
        assert split["plan"]["prediction"] == unsplit["plan"]["prediction"]
        assert abs(report_of(split).total("model") - report_of(unsplit).total("model")) <= 3 * 0.0051 * MIB  # logged to 0.01 MiB
        assert len([b for b in split["split"]["buffers"] if b["device"] == "CPU_Mapped"]) == 3  # one map per file
        replied = await greedy_reply(client)
        assert replied == expected and "Paris" in replied[0], (replied, expected)
        print(f"\nunsplit and split replies, {expected[1]} tokens each: {expected[0]!r}")
        assert (await load(client, str(demo_split[2])))["path"] == str(demo_split[0])  # any file loads the set

        for model in ("Damaged-Q4_1.gguf", str(damaged[2])):  # by its name in `models`, by a file's path
            with pytest.raises(RequestFailed) as error:
                await load(client, model)
            assert error.value.code == "not_gguf" and f"{damaged[1]} is not file 2" in error.value.message, error.value
        damaged[1].unlink()
        with pytest.raises(RequestFailed) as error:
            await load(client, "Damaged-Q4_1.gguf")
        assert error.value.code == "not_gguf" and f"{damaged[1]} is missing" in error.value.message, error.value
        assert (await client.request("status"))["model"]["path"] == str(demo_split[0])  # still loaded

    table = subprocess.run(
        [sys.executable, "-m", "vramchat.tui.cli", "--runtime-dir", str(daemon.runtime_dir), "models"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"},
    ).stdout  # fmt: skip
    rows = [line for line in table.splitlines() if "SmolLM2-135M-Instruct-Q4_1" in line]
    assert len(rows) == 1 and "(3 files)" in rows[0] and "MiB" in rows[0], table
    assert all(len(line) <= 80 for line in table.splitlines()), table


@pytest.mark.demo
async def test_a_partly_offloaded_split_model_maps_each_file_as_predicted(
    rpc_server_factory: Callable[..., RpcServer], daemon_factory: DaemonFactory, demo_split: list[Path]
) -> None:
    """llama.cpp maps each file of a set on its own: the CPU's mapped weights are the span of
    its tensors in each file, not one span over the set."""
    server = rpc_server_factory(*CPU_SERVER)
    daemon = offloading_daemon(daemon_factory, server.endpoint, extra=("--models-dir", str(demo_split[0].parent)))
    async with Client(daemon.runtime_dir) as client:
        model = await load(client, DEMO_SET, n_gpu_layers=16)
    predicted, logged = model["plan"]["prediction"]["cpu"]["weights"], report_of(model).total("model", gpu=False)
    print(f"\nCPU weights of the split set at 16 GPU layers: predicted {predicted / MIB:.2f} MiB, logged {logged / MIB:.2f} MiB")
    assert abs(predicted - logged) <= 3 * 0.0051 * MIB  # llama.cpp logs each of the 3 maps to 0.01 MiB


async def test_a_daemon_loads_a_split_model_from_the_hub_cache(
    daemon_factory: DaemonFactory, hub_cache: dict[str, Path], tiny_split: list[Path]
) -> None:
    daemon = daemon_factory("--no-load")  # HF_HOME reaches it through the environment
    async with Client(daemon.runtime_dir) as client:
        names = [m["name"] for m in (await client.request("models"))["models"] if m["source"] == "hf cache"]
        assert names[:2] == ["tinyorg/Tiny-GGUF:Q4_K_M", "tinyorg/Tiny-GGUF:Q8_0"]
        model = await load(client, "tinyorg/Tiny-GGUF:Q4_K_M", n_ctx=256)
        assert (model["state"], model["name"], model["path"]) == (
            "ready",
            "tinyorg/Tiny-GGUF:Q4_K_M",
            str(hub_cache[tiny_split[0].name]),
        )
        assert len([b for b in model["split"]["buffers"] if b["device"] == "CPU_Mapped"]) == 3
        listed = {m["name"]: m for m in (await client.request("models"))["models"]}
        assert listed["tinyorg/Tiny-GGUF:Q4_K_M"]["loaded"]
