#!/usr/bin/env bash
# Compile check of the CUDA sources of tokentrim's native extension for Hopper (sm_90a): nvcc and
# ptxas only, with CUB from the CUDA toolkit; nothing is linked or run, so no GPU and no CUDA build
# of torch are needed. A register spill is an error. Used by .ci/run; NVCC=/path/to/nvcc to choose.
set -euo pipefail
cd "$(dirname "$0")"
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
    echo "csrc/cuda/check_compile.sh: nvcc not found (put it on PATH or set NVCC)" >&2
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$NVCC" --version | tail -1
"$NVCC" -arch=sm_90a -O2 -std=c++17 -Xptxas -warn-spills,-Werror -c drift_select.cu -o "$out/drift_select.o"
echo "csrc/cuda: drift_select.cu compiles for sm_90a (no spills)"
