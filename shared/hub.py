"""A Hugging Face repo's quantizations, planned for a machine before a byte of weights is downloaded.

`list_quants` asks the Hub (through huggingface_hub, so HF_ENDPOINT, HF_TOKEN and its session
apply) for the repo's files at one commit and groups the GGUF ones into quantizations: single
files, shard sets (`-00001-of-00003.gguf`), quant folders; mmproj and imatrix files are no
model. `plan_repo` reads each quantization's GGUF headers by HTTP Range (shared/gguf_header.py),
inspects them as files on disk (every shard of a set), plans the fitted load with the same
`plan_load` as `vramchat plan`, and recommends one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers

from vramchat.shared.gguf import GGUFError, GGUFInfo, inspect_gguf, quant_in_name
from vramchat.shared.gguf_header import FIRST_READ, SHARD_READ, read_header, sparse_copy
from vramchat.shared.gguf_split import split_name
from vramchat.shared.load_plan import LoadPlan, Machine, plan_load
from vramchat.shared.planner import PlanError, PlanSettings
from vramchat.shared.units import format_bytes

DEFAULT_MIN_SPEED = 5.0  # tok/s: below this, a reply of a few hundred tokens takes minutes
NOT_MODELS = ("mmproj", "imatrix")  # GGUF files beside a model that are no model: a vision projector, importance data
READERS = 8  # headers read at once
VramBudget = int | str | Mapping[str, int | str] | None  # as plan_load takes it


class HubError(Exception):
    """The Hub could not answer what was asked; the message says what to do."""


@dataclass(frozen=True)
class HubFile:
    path: str  # in the repo
    size_bytes: int
    sha256: str | None  # its LFS oid, which a download is checked against; None for a file kept in git itself


@dataclass(frozen=True)
class Quant:
    name: str  # Q4_K_M, as the file or folder names it
    files: list[HubFile]  # one, or every shard of a set in order
    size_bytes: int


@dataclass(frozen=True)
class RepoListing:
    repo: str
    revision: str  # the commit every file was listed (and is read) at
    quants: list[Quant]


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or constants.ENDPOINT).rstrip("/")


def hub_error(exc: Exception, repo: str, endpoint: str | None = None) -> HubError:
    """What went wrong with the Hub, for a person, with what to do."""
    where = _endpoint(endpoint)
    page = f"{where}/{repo}"
    if isinstance(exc, GatedRepoError):
        if exc.response is not None and exc.response.status_code == 403:
            return HubError(f"{repo} is gated and your HF_TOKEN has no access yet: accept its terms at {page}")
        return HubError(
            f"{repo} is gated: accept its terms at {page}, then set HF_TOKEN to a token of yours ({where}/settings/tokens)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"no model repo {repo} on {where}: check the name (OWNER/NAME); a private repo needs HF_TOKEN")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo} has no revision by that name: give a branch, tag or commit of {page}")
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set, so the Hub is not asked: unset it to list or pull a repo")
    if isinstance(exc, httpx2.TransportError):
        why = str(exc) or type(exc).__name__
        return HubError(f"cannot reach the Hugging Face Hub at {where} ({why}): check the network, or HF_ENDPOINT")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"the Hub at {where} refused {repo}: {str(exc).splitlines()[0]}; try again later")
    return HubError(f"reading {repo} from {where} failed: {exc}")


def list_quants(
    repo: str, revision: str | None = None, *, endpoint: str | None = None, token: str | bool | None = None
) -> RepoListing:
    """The repo's quantizations at `revision` (default: its main branch), largest first.

    `endpoint` and `token` default to huggingface_hub's (HF_ENDPOINT as it was at import, HF_TOKEN
    or the saved token). Raises HubError."""
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True, token=token)
    except Exception as exc:
        raise hub_error(exc, repo, endpoint) from None
    groups: dict[str, list[HubFile]] = {}
    for sibling in info.siblings or []:
        name = PurePosixPath(sibling.rfilename).name.lower()
        if not name.endswith(".gguf") or any(word in name for word in NOT_MODELS):
            continue
        shard = split_name(sibling.rfilename)
        key = f"{shard.prefix}.gguf" if shard else sibling.rfilename
        sha = sibling.lfs.sha256 if sibling.lfs else None
        groups.setdefault(key, []).append(HubFile(sibling.rfilename, int(sibling.size or 0), sha))
    if not groups:
        raise HubError(f"{repo} has no GGUF model files: look for a repo of GGUF quantizations of it (often named {repo}-GGUF)")
    names = {key: quant_in_name(key) or PurePosixPath(key).stem for key in groups}
    clashes = {name for name in names.values() if list(names.values()).count(name) > 1}
    quants = [
        Quant(
            key.removesuffix(".gguf") if names[key] in clashes else names[key],
            sorted(files, key=lambda f: f.path),
            sum(f.size_bytes for f in files),
        )
        for key, files in groups.items()
    ]
    return RepoListing(repo, str(info.sha or revision or "main"), sorted(quants, key=lambda q: -q.size_bytes))


def inspect_quant(quant: Quant, headers: Mapping[str, bytes]) -> GGUFInfo:
    """inspect_gguf of the quant's header bytes laid out as sparse files of full size, named as in
    the repo (every shard of a set in one folder), with paths as in the repo."""
    in_repo = {PurePosixPath(f.path).name: f.path for f in quant.files}
    with tempfile.TemporaryDirectory(prefix="vramchat-hub-") as folder:
        for f in quant.files:
            sparse_copy(Path(folder) / PurePosixPath(f.path).name, headers[f.path], f.size_bytes)
        try:
            info = inspect_gguf(Path(folder) / PurePosixPath(quant.files[0].path).name)
        except GGUFError as exc:
            raise GGUFError(str(exc).replace(folder + "/", "")) from None
    return replace(info, path=in_repo[Path(info.path).name], shard_paths=[in_repo[Path(p).name] for p in info.shard_paths])


def read_headers(
    listing: RepoListing, files: list[HubFile], *, endpoint: str | None = None, token: str | bool | None = None
) -> dict[str, bytes | GGUFError]:
    """Each file's header by Range requests, several at once; a file that is no GGUF gets its error.
    Raises HubError when the Hub refuses (gated, gone) or cannot be reached."""
    headers = {**build_hf_headers(token=token), "Accept-Encoding": "identity"}

    def one(file: HubFile) -> bytes | GGUFError:
        url = hf_hub_url(listing.repo, file.path, revision=listing.revision, endpoint=endpoint)
        try:
            shard = split_name(file.path)
            return read_header(url, file.size_bytes, headers, SHARD_READ if shard and shard.no > 1 else FIRST_READ)
        except GGUFError as exc:
            return GGUFError(f"{file.path}: {exc}")
        except Exception as exc:
            raise hub_error(exc, listing.repo, endpoint) from None

    with ThreadPoolExecutor(READERS) as pool:
        return dict(zip((f.path for f in files), pool.map(one, files), strict=True))


def plan_dict(plan: LoadPlan) -> dict[str, Any]:
    """The plan as `vramchat plan --json` prints it."""
    return {
        "model": plan.info.to_dict(),
        "vram_budget": plan.budget,
        "available_ram": plan.machine.available_ram,
        "fit": plan.fitted.to_dict(),
        "table": [row.to_dict() for row in plan.table()],
        "swap": plan.swap.to_dict(),
    }


def placement(plan: LoadPlan) -> str:
    """Where the fitted load puts the model, in a few words: "20/31 layers on GPU"."""
    row = plan.prediction
    layers = row.n_layer + 1
    if row.n_gpu_layers == 0:
        return "all in RAM"
    if row.cpu_expert_layers and row.n_gpu_layers == layers:
        return f"GPU, experts of {row.cpu_expert_layers} in RAM"
    return f"{row.n_gpu_layers}/{layers} layers on GPU"


def _entry(
    quant: Quant, headers: Mapping[str, bytes | GGUFError], machine: Machine, settings: PlanSettings, vram_budget: VramBudget
) -> dict[str, Any]:
    """One row of plan_repo's quants: the files, and the plan of the fitted load or the error."""
    entry: dict[str, Any] = {
        "quant": quant.name,
        "files": [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in quant.files],
        "size_bytes": quant.size_bytes,
    }
    try:
        read = {}
        for f in quant.files:
            header = headers[f.path]
            if isinstance(header, GGUFError):
                raise header
            read[f.path] = header
        info = inspect_quant(quant, read)
        plan = plan_load(info, machine, "auto", settings, vram_budget=vram_budget)
    except (GGUFError, PlanError) as exc:
        return {**entry, "chat_template": None, "plan": None, "error": str(exc)}
    return {
        **entry,
        "bits_per_weight": round(8 * quant.size_bytes / max(info.parameters, 1), 2),
        "chat_template": info.has_chat_template,
        "where": placement(plan),
        "would_swap": plan.swap.would_swap,
        "tokens_per_s": plan.prediction.tokens_per_s,
        "reason": plan.fitted.reason,
        "plan": plan_dict(plan),
    }


def recommend(quants: list[dict[str, Any]], min_speed: float) -> tuple[str | None, str]:
    """The most precise quantization (most bits per weight) that runs without swapping at
    `min_speed` tok/s or more, and why in one line; None and why not when none does."""
    planned = sorted((q for q in quants if q.get("plan")), key=lambda q: -q["bits_per_weight"])
    if not planned:
        return None, "no quantization could be planned: see each one's error"
    good = [q for q in planned if not q["would_swap"] and (q["tokens_per_s"] or 0) >= min_speed]
    if not good:
        calm = [q for q in planned if not q["would_swap"]]
        if not calm:
            swap = min((q["plan"]["swap"] for q in planned), key=lambda s: s["needed"])
            return None, (
                f"every quantization would swap here: the smallest needs {format_bytes(swap['needed'])} of RAM "
                f"with {format_bytes(swap['available'])} available; free RAM, or lower --ctx"
            )
        fastest = max(calm, key=lambda q: q["tokens_per_s"] or 0)
        return None, (
            f"none runs at {min_speed:g} tok/s here without swapping: the fastest, {fastest['quant']}, "
            f"gives {fastest['tokens_per_s'] or 0:.1f} tok/s; lower --min-speed to take it"
        )
    best = good[0]
    why = (
        f"{best['quant']}: the most precise quantization ({best['bits_per_weight']:.1f} bits per weight) that runs "
        f"here without swapping at {min_speed:g} tok/s or more ({best['tokens_per_s'] or 0:.0f} tok/s expected)"
    )
    better = planned[: planned.index(best)]
    if better:
        above = better[-1]
        cause = "would swap" if above["would_swap"] else f"gives {above['tokens_per_s'] or 0:.1f} tok/s"
        why += f"; {above['quant']} {cause}"
    return best["quant"], why


def plan_repo(
    listing: RepoListing,
    machine: Machine,
    settings: PlanSettings,
    *,
    min_speed: float = DEFAULT_MIN_SPEED,
    vram_budget: VramBudget = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """Every quantization of `listing` planned for `machine` from its headers alone, and the
    recommendation: the JSON of `vramchat pull REPO --list --json`. A quantization that cannot
    be read or planned carries an `error` instead of a plan. Raises HubError."""
    files = [f for quant in listing.quants for f in quant.files]
    headers = read_headers(listing, files, endpoint=endpoint, token=token)
    quants = [_entry(quant, headers, machine, settings, vram_budget) for quant in listing.quants]
    recommended, why = recommend(quants, min_speed)
    return {
        "repo": listing.repo,
        "revision": listing.revision,
        "quants": quants,
        "recommended": recommended,
        "why": why,
        "min_speed": min_speed,
    }
