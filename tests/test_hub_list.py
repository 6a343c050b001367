"""`vramchat pull REPO --list`: a Hub repo's quantizations planned from their GGUF headers alone,
against the Hub stand-in (tests/hub_standin.py) serving real quantizations of the demo model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader
from huggingface_hub import HfApi, get_hf_file_metadata, get_session, hf_hub_url

from vramchat.shared import hub
from vramchat.shared.gguf import inspect_gguf
from vramchat.shared.gguf_header import read_header
from vramchat.shared.load_options import settings_from
from vramchat.shared.load_plan import Machine, plan_load
from vramchat.tui.commands.hub_list import WIDTH, table

from helpers import free_port
from hub_repos import BASE_REPO, GATED_REPO, GATED_TOKEN, INSTRUCT_REPO, NO_GGUF_REPO, SHARDS
from hub_standin import HubStandin, sha256_of

MIB, GIB = 1 << 20, 1 << 30
SETTINGS = settings_from({}, {}, 4096)
# Every layer in RAM; a GPU (budget: free less the 1 GiB margin) that takes some of the layers; too little RAM.
MACHINES = {
    "cpu": Machine(0, 8 * GIB),
    "split": Machine(1750 * MIB, 8 * GIB, "NVIDIA stand-in"),
    "swap": Machine(0, 40 * MIB),
}


def pull(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI, in a process of its own: huggingface_hub reads HF_ENDPOINT when it is imported."""
    return subprocess.run(
        [sys.executable, "-m", "vramchat.tui.cli", "pull", *args], capture_output=True, text=True, env=env, timeout=120
    )


def on_disk_plan(hub_repos: Path, repo: str, quant: dict[str, Any], machine: Machine) -> dict[str, Any]:
    """What `vramchat plan` plans for the same file on disk, with the paths named as in the repo."""
    info = inspect_gguf(hub_repos / repo / quant["files"][0]["path"])
    info = replace(info, path=quant["files"][0]["path"], shard_paths=[f["path"] for f in quant["files"]])
    return hub.plan_dict(plan_load(info, machine, "auto", SETTINGS))


def test_the_listing_groups_shards_and_skips_what_is_no_model(hub_standin: HubStandin, hub_repos: Path) -> None:
    listing = hub.list_quants(INSTRUCT_REPO, endpoint=hub_standin.endpoint)
    assert listing.revision == hub_standin.commit(INSTRUCT_REPO)
    assert [q.name for q in listing.quants] == ["Q8_0", "Q4_K_M", "Q2_K"]  # largest first; mmproj and imatrix left out
    for quant in listing.quants:
        local = [hub_repos / INSTRUCT_REPO / f.path for f in quant.files]
        assert quant.size_bytes == sum(p.stat().st_size for p in local)
        assert [f.sha256 for f in quant.files] == [sha256_of(p) for p in local]
    shards = listing.quants[1].files
    assert [f.path for f in shards] == [
        f"Q4_K_M/SmolLM2-135M-Instruct-Q4_K_M-{no:05d}-of-{SHARDS:05d}.gguf" for no in range(1, SHARDS + 1)
    ]


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_each_plan_equals_the_plan_of_the_file_on_disk_from_a_tenth_of_the_bytes(
    hub_standin: HubStandin, hub_repos: Path, machine: str
) -> None:
    listing = hub.list_quants(INSTRUCT_REPO, endpoint=hub_standin.endpoint)
    result = hub.plan_repo(listing, MACHINES[machine], SETTINGS, endpoint=hub_standin.endpoint)
    assert [q["quant"] for q in result["quants"]] == ["Q8_0", "Q4_K_M", "Q2_K"]
    for quant in result["quants"]:
        assert quant["plan"] == on_disk_plan(hub_repos, INSTRUCT_REPO, quant, MACHINES[machine]), quant["quant"]
    shards = result["quants"][1]["plan"]["model"]
    assert shards["shards"] == SHARDS and shards["file_size"] == result["quants"][1]["size_bytes"]
    swaps = {q["quant"]: q["would_swap"] for q in result["quants"]}
    assert set(swaps.values()) == {machine == "swap"}
    if machine == "split":
        assert all("layers on GPU" in q["where"] for q in result["quants"]), [q["where"] for q in result["quants"]]
    read, size = hub_standin.bytes_served(INSTRUCT_REPO), hub_standin.repo_bytes(INSTRUCT_REPO)
    assert read < 0.1 * size, f"--list read {read} of the repo's {size} bytes"


def test_the_cli_plans_what_vramchat_plan_plans_on_disk(hub_standin: HubStandin, hub_repos: Path) -> None:
    limits = ("--vram", "1750MiB", "--ram", "8GiB", "--ctx", "2048")
    listed = pull(INSTRUCT_REPO, "--list", "--json", *limits)
    assert listed.returncode == 0, listed.stderr
    result = json.loads(listed.stdout)
    for quant in result["quants"]:
        local = hub_repos / INSTRUCT_REPO / quant["files"][0]["path"]
        planned = subprocess.run(
            [sys.executable, "-m", "vramchat.tui.cli", "plan", str(local), "--json", *limits], capture_output=True, text=True
        )
        assert planned.returncode == 0, planned.stderr
        expected = json.loads(planned.stdout)
        expected["model"].update(path=quant["files"][0]["path"], shard_paths=[f["path"] for f in quant["files"]])
        assert quant["plan"] == expected, quant["quant"]
    assert hub_standin.bytes_served(INSTRUCT_REPO) < 0.1 * hub_standin.repo_bytes(INSTRUCT_REPO)


def test_the_json_has_the_issues_shape(hub_standin: HubStandin) -> None:
    listed = pull(INSTRUCT_REPO, "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    result = json.loads(listed.stdout)
    assert {"repo", "revision", "quants", "recommended"} <= set(result)
    assert result["repo"] == INSTRUCT_REPO and result["revision"] == hub_standin.commit(INSTRUCT_REPO)
    assert result["recommended"] in [q["quant"] for q in result["quants"]]
    for quant in result["quants"]:
        assert {"quant", "files", "size_bytes", "plan", "chat_template", "reason"} <= set(quant)
        assert quant["chat_template"] is True
        assert quant["size_bytes"] == sum(f["size_bytes"] for f in quant["files"])
        for file in quant["files"]:
            assert set(file) == {"path", "size_bytes", "sha256"} and len(file["sha256"]) == 64
        assert set(quant["plan"]) == {"model", "vram_budget", "available_ram", "fit", "table", "swap"}


def test_the_table_fits_80_columns_and_marks_the_recommendation(hub_standin: HubStandin) -> None:
    listed = pull(INSTRUCT_REPO, "--list", "--vram", "1750MiB", "--ram", "8GiB")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert max(map(len, lines)) <= WIDTH, listed.stdout
    rows = {line[2:].split()[0]: line for line in lines if " MiB " in line and line[:2].strip("*! ") == ""}
    assert set(rows) == {"Q8_0", "Q4_K_M", "Q2_K"}, listed.stdout
    assert "mmproj" not in listed.stdout and "imatrix" not in listed.stdout
    assert rows["Q8_0"].startswith("*") and "layers on GPU" in rows["Q8_0"]
    assert rows["Q4_K_M"].split()[-1] == str(SHARDS)
    assert any(line.startswith("* recommended: Q8_0") for line in lines), listed.stdout


def test_a_base_model_is_flagged_for_having_no_chat_template(hub_standin: HubStandin) -> None:
    listed = pull(BASE_REPO, "--list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.startswith("*!Q2_K") for line in listed.stdout.splitlines()), listed.stdout
    assert "! no chat template: a base model" in listed.stdout
    result = json.loads(pull(BASE_REPO, "--list", "--json").stdout)
    assert [q["chat_template"] for q in result["quants"]] == [False]


def test_a_gated_repo_needs_hf_token(hub_standin: HubStandin) -> None:
    refused = pull(GATED_REPO, "--list", env=hub_standin.env())
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "gated" in refused.stderr and "set HF_TOKEN" in refused.stderr
    wrong = pull(GATED_REPO, "--list", env=hub_standin.env("hf_not_this_one"))
    assert wrong.returncode == 1 and "no access" in wrong.stderr
    listed = pull(GATED_REPO, "--list", "--json", env=hub_standin.env(GATED_TOKEN))
    assert listed.returncode == 0, listed.stderr
    assert [q["quant"] for q in json.loads(listed.stdout)["quants"]] == ["Q2_K"]


@pytest.mark.parametrize(
    ("repo", "says"),
    [
        ("vramchat-test/no-such-repo-GGUF", "no model repo vramchat-test/no-such-repo-GGUF"),
        (NO_GGUF_REPO, "has no GGUF model files"),
        (f"{INSTRUCT_REPO}:Q5_K_M", "has no quantization Q5_K_M: it has Q8_0, Q4_K_M, Q2_K"),
        ("unreachable", "cannot reach the Hugging Face Hub"),
    ],
)
def test_failures_are_one_line_and_exit_1(hub_standin: HubStandin, repo: str, says: str) -> None:
    env = hub_standin.env()
    if repo == "unreachable":
        repo, env["HF_ENDPOINT"] = INSTRUCT_REPO, f"http://127.0.0.1:{free_port()}"
    failed = pull(repo, "--list", env=env)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("vramchat pull: ") and failed.stderr.count("\n") == 1, failed.stderr
    assert says in failed.stderr


def test_the_recommendation_is_the_most_precise_that_is_fast_enough(hub_standin: HubStandin) -> None:
    listing = hub.list_quants(INSTRUCT_REPO, endpoint=hub_standin.endpoint)
    quants = hub.plan_repo(listing, MACHINES["cpu"], SETTINGS, endpoint=hub_standin.endpoint)["quants"]
    speed = {q["quant"]: q["tokens_per_s"] for q in quants}
    assert speed["Q8_0"] < speed["Q4_K_M"] < speed["Q2_K"]  # fewer bytes a token: faster on the CPU
    assert hub.recommend(quants, 1.0)[0] == "Q8_0"
    chosen, why = hub.recommend(quants, (speed["Q8_0"] + speed["Q4_K_M"]) / 2)
    assert chosen == "Q4_K_M" and f"Q8_0 gives {speed['Q8_0']:.1f} tok/s" in why
    chosen, why = hub.recommend(quants, 10 * speed["Q2_K"])
    assert chosen is None and "the fastest, Q2_K" in why and "lower --min-speed" in why
    swapping = hub.plan_repo(listing, MACHINES["swap"], SETTINGS, endpoint=hub_standin.endpoint)
    assert swapping["recommended"] is None and "every quantization would swap" in swapping["why"]


def test_a_long_name_and_an_unreadable_quant_still_fit_80_columns() -> None:
    row = {"size_bytes": 75 * GIB, "chat_template": True, "bits_per_weight": 8.5, "where": "GPU, experts of 35 in RAM"}
    row |= {"would_swap": True, "tokens_per_s": 1.5, "files": [{}] * 2}
    result = {
        "repo": "unsloth/" + "Very-Long-Model-Name-" * 3 + "GGUF",
        "revision": "0" * 40,
        "quants": [
            {**row, "quant": "Llama-3.3-70B-Instruct-UD-Q4_K_XL"},
            {"quant": "IQ1_S", "size_bytes": 10, "files": [{}], "chat_template": None, "plan": None, "error": "x " * 100},
        ],
        "recommended": None,
        "why": "none runs at 5 tok/s here without swapping: " * 3,
    }
    lines = table(result, "this machine: no GPU, 64 GiB RAM available", 4096)
    assert max(map(len, lines)) <= WIDTH, "\n".join(lines)
    assert any("Llama-3.3-70B" in line and "…" in line for line in lines)
    assert any(line.startswith("  IQ1_S: x x") for line in lines)


def test_a_header_longer_than_the_first_read_is_read_in_doubling_ranges(hub_standin: HubStandin, hub_repos: Path) -> None:
    path = "SmolLM2-135M-Instruct-Q8_0.gguf"
    local = hub_repos / INSTRUCT_REPO / path
    url = hf_hub_url(INSTRUCT_REPO, path, endpoint=hub_standin.endpoint)
    header = read_header(url, local.stat().st_size, {}, first=64 << 10)
    assert header == local.read_bytes()[: len(header)]
    assert GGUFReader(local).data_offset == -(-len(header) // 32) * 32  # the tensor data starts at the next alignment
    ranges = [asked for _, where, asked in hub_standin.requests if where.endswith(path)]
    assert ranges[:3] == ["bytes=0-65535", "bytes=65536-131071", "bytes=131072-262143"]
    assert len(header) < hub_standin.bytes_served(INSTRUCT_REPO, path) < 2 * len(header)


def test_a_quant_that_cannot_be_read_gets_its_error_and_the_others_their_plans(hub_standin: HubStandin) -> None:
    hub_standin.corrupt(INSTRUCT_REPO, "SmolLM2-135M-Instruct-Q2_K.gguf", offset=0)
    listing = hub.list_quants(INSTRUCT_REPO, endpoint=hub_standin.endpoint)
    result = hub.plan_repo(listing, MACHINES["cpu"], SETTINGS, endpoint=hub_standin.endpoint)
    broken = result["quants"][2]
    assert broken["plan"] is None
    assert broken["error"] == "SmolLM2-135M-Instruct-Q2_K.gguf: it does not start with GGUF: it is not a GGUF model file"
    assert [q["plan"] is not None for q in result["quants"]] == [True, True, False] and result["recommended"] == "Q8_0"
    lines = table(result, "this machine: no GPU", 4096)
    assert any("Q2_K" in line and "not planned: see below" in line for line in lines)
    assert max(map(len, lines)) <= WIDTH


def test_the_standin_answers_huggingface_hub_as_the_hub_does(hub_standin: HubStandin, hub_repos: Path) -> None:
    """The tree listing across pages, and resolve's headers, Range, corruption and throttle."""
    hub_standin.tree_expanded_page_size = 2
    api = HfApi(endpoint=hub_standin.endpoint)
    tree = {entry.path for entry in api.list_repo_tree(INSTRUCT_REPO, recursive=True, expand=True)}
    assert tree == {e.path for e in hub_standin.entries(INSTRUCT_REPO)} | {"Q4_K_M"}
    path = "SmolLM2-135M-Instruct-Q2_K.gguf"
    url = hf_hub_url(INSTRUCT_REPO, path, endpoint=hub_standin.endpoint)
    meta = get_hf_file_metadata(url)
    local = hub_repos / INSTRUCT_REPO / path
    assert (meta.etag, meta.size, meta.commit_hash) == (sha256_of(local), local.stat().st_size, hub_standin.commit(INSTRUCT_REPO))
    hub_standin.corrupt(INSTRUCT_REPO, path, offset=10)
    hub_standin.throttle(2 * MIB)
    before, started = hub_standin.bytes_served(), time.monotonic()
    body = get_session().get(url, headers={"Range": f"bytes=0-{MIB - 1}"}).content
    assert time.monotonic() - started >= 0.4  # 1 MiB at 2 MiB/s
    assert hub_standin.bytes_served() - before == len(body) == MIB
    expected = bytearray(local.read_bytes()[:MIB])
    expected[10] ^= 0xFF
    assert body == expected and hashlib.sha256(local.read_bytes()).hexdigest() == meta.etag
