"""Real quantizations of the demo model, laid out as Hub repos the way people publish them.

llama.cpp's own quantizer makes Q8_0, Q4_K_M and Q2_K from the demo model in seconds. The
instruct repo holds two single files, a Q4_K_M folder of shards, an mmproj and an imatrix GGUF
and a README; a base-model repo holds one quant without a chat template; a gated repo one
quant; and a repo without any GGUF. tests/hub_standin.py serves them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gguf_factory import TinyModelSpec, split_gguf, write_tiny_llama

OWNER = "vramchat-test"
INSTRUCT_REPO = f"{OWNER}/SmolLM2-135M-Instruct-GGUF"  # Q8_0 and Q2_K files, a Q4_K_M folder of 3 shards, mmproj, imatrix
BASE_REPO = f"{OWNER}/SmolLM2-135M-GGUF"  # one quant without a chat template (a base model)
GATED_REPO = f"{OWNER}/SmolLM2-135M-Instruct-gated-GGUF"  # one quant, behind GATED_TOKEN when the fixture gates it
NO_GGUF_REPO = f"{OWNER}/SmolLM2-135M-Instruct"  # safetensors and config only
GATED_TOKEN = "hf_standin_gated_token"
MODEL = "SmolLM2-135M-Instruct"
SHARDS = 3

QUANTIZE = """
import sys, llama_cpp
src, *jobs = sys.argv[1:]
for dst, ftype in zip(jobs[::2], jobs[1::2]):
    params = llama_cpp.llama_model_quantize_default_params()
    params.allow_requantize = True
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        sys.exit(f"quantizing to {ftype} failed")
"""


def make_hub_repos(root: Path, demo_model: Path) -> Path:
    """Quantize the demo model with llama.cpp's own quantizer (a process of its own: llama_cpp stays
    out of the test process) and lay the repos out under `root`; seconds in all."""
    work = root / ".work"
    work.mkdir(parents=True)
    quants = {name: work / f"{MODEL}-{name}.gguf" for name in ("Q8_0", "Q4_K_M", "Q2_K")}
    jobs = [str(part) for name, path in quants.items() for part in (path, name)]
    subprocess.run([sys.executable, "-c", QUANTIZE, str(demo_model), *jobs], check=True, capture_output=True)

    instruct = root / INSTRUCT_REPO
    instruct.mkdir(parents=True)
    for name in ("Q8_0", "Q2_K"):
        os.link(quants[name], instruct / quants[name].name)
    (instruct / "Q4_K_M").mkdir()
    split_gguf(quants["Q4_K_M"], instruct / "Q4_K_M" / quants["Q4_K_M"].name, SHARDS)
    write_tiny_llama(instruct / "mmproj-SmolLM2-F16.gguf", TinyModelSpec(f16=True))
    write_tiny_llama(instruct / f"{MODEL}-imatrix.gguf", TinyModelSpec())
    (instruct / "README.md").write_text(f"# {MODEL} GGUF\n\nQuantizations of {MODEL} for llama.cpp.\n")
    (instruct / ".gitattributes").write_text("*.gguf filter=lfs diff=lfs merge=lfs -text\n")

    base = root / BASE_REPO
    base.mkdir(parents=True)
    drop_template = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--remove-metadata", "tokenizer.chat_template"]
    subprocess.run(
        [*drop_template, "--force", str(quants["Q2_K"]), str(base / "SmolLM2-135M-Q2_K.gguf")], check=True, capture_output=True
    )

    gated = root / GATED_REPO
    gated.mkdir(parents=True)
    os.link(quants["Q2_K"], gated / quants["Q2_K"].name)

    plain = root / NO_GGUF_REPO
    plain.mkdir(parents=True)
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (plain / "model.safetensors").write_bytes(b"\0" * 4096)
    shutil.rmtree(work)
    return root
