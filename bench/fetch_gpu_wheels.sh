#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt (Python 3.12, manylinux x86-64) into .whl/ so that
# `bash bench/gpu_check.sh` can install them on the offline GPU machine. Run here, where pip can
# reach an index; .whl/ is git-ignored: name it in the device run's `carry` (about 45 MB).
# Usage: bash bench/fetch_gpu_wheels.sh [DEST]      (default: .whl in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: --require-hashes -r bench/gpu_wheels.txt \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest"
n=$(ls "$dest"/*.whl | wc -l)
want=$(grep -c '^[A-Za-z]' bench/gpu_wheels.txt)
[ "$n" -eq "$want" ] || { echo "fetch_gpu_wheels: expected $want wheels in $dest, found $n" >&2; exit 1; }
echo "fetch_gpu_wheels: $n wheels in $dest ($(du -sh "$dest" | cut -f1))"
