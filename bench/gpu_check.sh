#!/usr/bin/env bash
# One-shot GPU validation for a lent H100/H200 (issue 7): GPU tests, then the full benchmark.
# Usage on the device machine, from the repo root:  bash bench/gpu_check.sh [OUT_DIR]
# Logs and result files land in OUT_DIR (default $OUT, else bench/results/gpu-run).
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu-run}}
mkdir -p "$out"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
# The GPU image has torch + triton but not necessarily the package's Python deps.
pip install -q --no-deps -e . >/dev/null 2>&1 || true
python -m pytest -q -x -m gpu -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1; echo "gpu tests rc=$?" >> "$out/env.txt"
python -m pytest -q -p no:cacheprovider --ignore=tests/test_video.py > "$out/pytest_all.log" 2>&1; echo "all tests rc=$?" >> "$out/env.txt"
python bench/run.py --device cuda --out-dir "$out" > "$out/bench.log" 2>&1; echo "bench rc=$?" >> "$out/env.txt"
tail -n 3 "$out"/*.log
