#!/usr/bin/env bash
# Prints the CMAKE_ARGS for a llama-cpp-python build that works on this machine.
#
# - A CMAKE_ARGS set by the user wins, verbatim, except that -DGGML_RPC=ON is appended unless it
#   names GGML_RPC itself.
# - x86-64: GGML_NATIVE=OFF plus each instruction set /proc/cpuinfo reports. The native build
#   also compiles the AMX kernels, and they segfault on CPUs that advertise AMX to the compiler
#   but not to the program (ggml_backend_amx_mul_mat on a quantized model). Naming the sets
#   ourselves leaves AMX out.
# - CUDA only where both nvcc and an NVIDIA GPU are present: a toolkit alone is not enough.
# - Always llama.cpp's RPC backend (GGML_RPC): `vramchat rpc-server` serves a machine's devices
#   with it, and the engine offloads to such servers as to a local GPU.
set -euo pipefail

if [ -n "${CMAKE_ARGS:-}" ]; then
    case "$CMAKE_ARGS" in
        *GGML_RPC*) printf '%s\n' "$CMAKE_ARGS" ;;
        *) printf '%s\n' "$CMAKE_ARGS -DGGML_RPC=ON" ;;
    esac
    exit 0
fi

args=()
if [ "$(uname -m)" = "x86_64" ] && [ -r /proc/cpuinfo ]; then
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    args+=(-DGGML_NATIVE=OFF)
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512; do
        cpu_flag=${pair%%:*}
        ggml_flag=${pair##*:}
        case "$flags" in
            *" $cpu_flag "*) args+=("-DGGML_${ggml_flag}=ON") ;;
        esac
    done
fi

has_gpu() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        return 0
    fi
    [ -e /dev/nvidia0 ]
}
if command -v nvcc >/dev/null 2>&1 && has_gpu; then
    args+=(-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native)
fi

args+=(-DGGML_RPC=ON)
printf '%s\n' "${args[*]}"
