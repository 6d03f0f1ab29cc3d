#!/usr/bin/env bash
# The GPU validation pass for a lent H100/H200, in one script, and its dry run on any CPU machine.
#
#   bash bench/gpu_check.sh [--dry-run] [--keep-going] [--quick] [OUT_DIR]
#
# On the GPU machine (offline, Python 3.12, torch 2.11 + triton 3.6), from the repository root:
#   1. environment report (nvidia-smi, versions)           -> OUT/env.txt
#   2. wheels the image lacks, from .whl/ if carried        (bash bench/fetch_gpu_wheels.sh here first)
#   3. offline editable install: pip --no-build-isolation --no-deps --no-index -e .
#   4. `import tokentrim.kernels` from outside the repository
#   5. Hopper compile gate (bench/aot.py: registers, spills, shared memory, wgmma) -> OUT/aot.json
#   6. GPU-marked tests, 7. the whole suite, 8. python bench/run.py --device cuda -> OUT/
# Every step logs to OUT/<step>.log; the first failing step stops the script with its name and log
# (with --keep-going, failing test/bench steps are reported and the script goes on, exiting 1 at the
# end; install and import failures always stop it). OUT_DIR defaults to $OUT, else
# bench/results/gpu-run.
#
# --dry-run runs every step on a CPU machine in a few minutes: the install goes into a fresh venv
# that sees this interpreter's packages except those the GPU image lacks (diffusers, nvtx, av,
# imageio_ffmpeg are hidden, as there; the Python 3.12 wheels are not installed), pytest steps run
# the same selections through the Triton interpreter (the full suite is collected, not run: CI
# runs it already), the compile gate and the benchmark run at their smallest settings.
# --quick: the benchmark's --quick mode on the GPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

dry=0 keep=0 quick=0 out=""
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    --keep-going) keep=1 ;;
    --quick) quick=1 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $a (see --help)" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu_check: one OUT_DIR only, got '$out' and '$a'" >&2; exit 2; }; out=$a ;;
  esac
done
out=${out:-${OUT:-bench/results/gpu-run}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=()
t_start=$(date +%s)

# step NAME FATAL CMD...: run CMD with its output in OUT/NAME.log (and the tail on screen)
step() {
  local name=$1 fatal=$2; shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $*"
  set +e
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  set -e
  tail -n 4 "$out/$name.log" | sed 's/^/   | /'
  echo "   $name: rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"
  if [ "$rc" -ne 0 ]; then
    if [ "$fatal" = 1 ] || [ "$keep" = 0 ]; then
      echo "gpu_check: step '$name' FAILED (rc=$rc); full log: $out/$name.log" >&2
      exit 1
    fi
    failed+=("$name")
  fi
}

: > "$out/steps.txt"
PY=python3
if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi

# 1. environment
env_report() {
  date -u
  git -C "$repo" rev-parse HEAD 2>/dev/null || echo "git: not a checkout"
  if [ "$dry" = 1 ]; then echo "dry run: no GPU used"; else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
}
step env 1 env_report
cp "$out/env.log" "$out/env.txt"

# 2. wheels the image lacks
wheels() {
  if [ "$dry" = 1 ]; then
    echo "dry run: the Python 3.12 wheels are not installed; diffusers, nvtx, av, imageio_ffmpeg are hidden instead"
    return 0
  fi
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "no .whl/ folder: diffusers/av/nvtx absent, the tests that need them skip (bash bench/fetch_gpu_wheels.sh to bring them)"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$tmp/site" .whl/*.whl
  ls "$tmp/site"
}
step wheels 1 wheels
if [ "$dry" = 0 ] && [ -d "$tmp/site" ]; then export PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi

# 3. offline install (dry run: into a fresh venv that sees this interpreter's packages, minus the hidden ones)
make_dry_venv() {
  "$PY" -m venv --without-pip "$tmp/venv"  # pip, setuptools, wheel come from the parent, like the image's
  local site
  site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" -c "import sys; print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))" > "$site/_parent_site.pth"
  cat > "$site/_gpu_image.py" <<'PYEOF'
"""Dry run of bench/gpu_check.sh: hide the packages the GPU image does not have."""
import sys

HIDDEN = ("diffusers", "nvtx", "av", "imageio_ffmpeg")


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: the GPU image lacks it)", name=name)
        return None


sys.meta_path.insert(0, _Hide())
PYEOF
  echo "import _gpu_image" > "$site/_zz_gpu_image.pth"
}
if [ "$dry" = 1 ]; then make_dry_venv; PY="$tmp/venv/bin/python"; fi
step install 1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .

# 4. the package imports from outside the repository (tokentrim.kernels maps to kernels/)
import_check() (
  cd "$tmp"
  "$PY" - <<'PYEOF'
import importlib, os, sys
import tokentrim, tokentrim.kernels, tokentrim.ops
for m in ("drift", "masked_attention", "kv_compact"):
    importlib.import_module(f"tokentrim.kernels.{m}")
print("tokentrim", tokentrim.__file__)
print("tokentrim.kernels", tokentrim.kernels.__file__)
for name in ("diffusers", "nvtx", "av", "transformers"):
    try:
        importlib.import_module(name)
        print(f"{name}: present")
    except ImportError as e:
        print(f"{name}: absent ({e})")
PYEOF
)
step import 1 import_check

# 5. Hopper compile gate (no GPU needed; the dry run compiles the smallest kernel only)
if [ "$dry" = 1 ]; then
  step aot 0 env -u TRITON_INTERPRET "$PY" bench/aot.py --only kv_compact --json "$out/aot.json"
else
  step aot 0 "$PY" bench/aot.py --json "$out/aot.json"
fi

# 6. GPU-marked tests (on CPU they are collected and skipped)
step pytest_gpu 0 "$PY" -m pytest -q -x -m gpu -p no:cacheprovider -rs

# 7. the whole suite (dry run: collected in the image-like venv, plus the modules whose skips it shows)
if [ "$dry" = 1 ]; then
  step pytest_collect 0 "$PY" -m pytest -q --collect-only -p no:cacheprovider
  step pytest_skips 0 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_video.py tests/test_schedule.py
else
  step pytest_all 0 "$PY" -m pytest -q -p no:cacheprovider -rs
fi

# 8. the benchmark
if [ "$dry" = 1 ]; then
  step bench 0 "$PY" bench/run.py --device cpu --quick --repeats 1 --sections drift,attention --out-dir "$out/bench"
elif [ "$quick" = 1 ]; then
  step bench 0 "$PY" bench/run.py --device cuda --quick --out-dir "$out"
else
  step bench 0 "$PY" bench/run.py --device cuda --out-dir "$out"
fi

echo "gpu_check: $(( $(date +%s) - t_start )) s in all; logs in $out"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all steps passed"
