"""Hopper compile gate: compile every Triton kernel of tokentrim for sm_90a on any machine.

``python bench/aot.py [--json OUT.json] [--only attention,drift]`` prints, per kernel and per
autotune config it can pick, the registers, spill bytes and shared memory of the sm_90a build
(Triton's own compiler and bundled ptxas; no GPU needed), and whether the PTX uses wgmma.

How: every case below calls a real launcher (``tokentrim.kernels.*``) on CPU tensors of the Wan
shapes. A fake Triton driver reports an sm_90 target, ``Autotuner.run`` is replaced by "every
config", and Triton's ``jit_cache_hook`` receives each would-be compile (signature, constexprs,
specialisation attributes and options exactly as a real launch on those arguments makes them)
reaches ``JITFunction._do_compile``, replaced here: it compiles with ``triton.compile`` for
``GPUTarget("cuda", 90, 64)`` and returns None, so nothing is launched. Launchers that read outputs of an earlier launch see uninitialised buffers; that is
fine, nothing is checked but the compile.

Must run without TRITON_INTERPRET (the interpreter replaces ``@triton.jit``); this script removes
it before importing triton. ``tests/test_aot.py`` (``pytest -m aot``) runs it in a subprocess.
Every module of ``kernels/`` that defines a ``@triton.jit`` kernel must have an entry in ``CASES``
(``tests/test_aot.py::test_every_kernel_module_has_an_aot_case`` checks it in the default suite).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 64)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on H100/H200 (opt-in maximum)


class _FakeCudaDriver:
    """Just enough of a Triton driver for JITFunction.run to bind arguments and ask to compile."""

    def __init__(self):
        from triton.backends.nvidia.driver import CudaDriver

        self._real = CudaDriver  # only its class-level helpers are used (type mapping)

    def is_active(self):
        return True

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("aot: nothing is benchmarked")

    def map_python_to_cpp_type(self, ty):
        return self._real.map_python_to_cpp_type(self, ty)

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("aot: nothing is benchmarked")

    def clear_cache(self, cache):
        pass


def _ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes from Triton's bundled ptxas (-v) for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    regs = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return {
        "registers": max(map(int, regs)) if regs else None,
        "spill_stores": sum(map(int, stores)),
        "spill_loads": sum(map(int, loads)),
        "stack_frame": max(map(int, stack)) if stack else 0,
    }


class _Recorder:
    """Collects one compiled-for-sm_90a record per distinct (kernel, specialisation, options)."""

    def __init__(self):
        self.records: list[dict] = []
        self.case = ""
        self._seen: set = set()

    def compile(self, jit, key, signature, constexprs, options, attrs) -> None:
        """Stand-in for ``JITFunction._do_compile``: build for sm_90a, record, launch nothing."""
        ident = (jit.__name__, str(key))
        if ident in self._seen:
            return
        self._seen.add(ident)
        kw = {"constexprs": constexprs, "signature": signature, "options": options}
        src = jit.ASTSource(jit, signature, constexprs, attrs)
        options = kw["options"]
        t0 = time.perf_counter()
        compiled = triton.compile(src, target=TARGET, options=options.__dict__)
        dt = time.perf_counter() - t0
        ptx = compiled.asm["ptx"]
        rec = {
            "case": self.case,
            "kernel": jit.__name__,
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
            "constexprs": {
                (k if isinstance(k, str) else jit.arg_names[k[0]]): v
                for k, v in kw["constexprs"].items()
                if isinstance(v, (int, float, bool, str)) and (not isinstance(k, tuple) or len(k) == 1)
            },
            "shared_bytes": int(compiled.metadata.shared),
            "wgmma": ("wgmma.mma_async" in ptx),
            "compile_s": round(dt, 2),
        }
        rec.update(_ptxas_report(ptx))
        self.records.append(rec)


def _install(recorder: _Recorder):
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    driver.set_active(_FakeCudaDriver())

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        recorder.compile(self, key, signature, constexprs, options, attrs)
        return None  # JITFunction.run returns before launching

    JITFunction._do_compile = do_compile

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for cfg in self.prune_configs(kwargs):
            merged = {**kwargs, **cfg.all_kwargs(), "warmup": False}
            self.fn.run(*args, **merged)
        return None

    Autotuner.run = every_config


# ---------------------------------------------------------------------------------------------
# Cases at the Wan2.1-1.3B shapes (832x480: 1560 tokens per latent frame, 12 heads of 128).
# Keys: the kernels/ module a case covers. A case is a callable that launches that module's
# kernels; tensors are CPU tensors (only their dtype, strides and alignment matter).

TOKENS_PER_FRAME = 1560
HEADS, HEAD_DIM = 12, 128


def _attention_cases() -> list[tuple[str, Callable[[], object]]]:
    from tokentrim.kernels import masked_attention as ma

    cases = []
    lq = 3 * TOKENS_PER_FRAME
    lk = 21 * TOKENS_PER_FRAME
    for dtype in (torch.bfloat16, torch.float16):
        # k/v as views of a [layers, 2, B, L, H, D] cache, the way the model passes them
        cache = torch.empty(1, 2, 1, lk, HEADS, HEAD_DIM, dtype=dtype)
        q = torch.empty(1, lq, HEADS, HEAD_DIM, dtype=dtype)
        kv_len = torch.full((1,), lk, dtype=torch.int32)
        keep = torch.ones(1, lk, dtype=torch.bool)
        name = str(dtype).replace("torch.", "")
        cases.append((f"{name} dense", lambda q=q, c=cache, n=kv_len: ma.masked_attention(q, c[0, 0], c[0, 1], kv_len=n)))
        cases.append(
            (
                f"{name} keep",
                lambda q=q, c=cache, n=kv_len, m=keep: ma.masked_attention(q, c[0, 0], c[0, 1], keep=m, kv_len=n),
            )
        )
    return cases


def _attention_fp32_cases():
    from tokentrim.kernels import masked_attention as ma

    q = torch.empty(1, 3 * TOKENS_PER_FRAME, HEADS, HEAD_DIM, dtype=torch.float32)
    k = torch.empty(1, 21 * TOKENS_PER_FRAME, HEADS, HEAD_DIM, dtype=torch.float32)
    return [("fp32 dense (tests only)", lambda: ma.masked_attention(q, k, k))]


def _drift_cases():
    from tokentrim.kernels import drift

    cases = []
    for dtype in (torch.bfloat16,):  # the dtype only changes the loads; bf16 is what rollouts pass
        cand = torch.empty(1, 3, 16, 60, 104, dtype=dtype)
        prev = torch.empty(1, 3, 16, 60, 104, dtype=dtype)
        name = str(dtype).replace("torch.", "")
        cases.append((f"{name} two launches", lambda c=cand, p=prev: drift.drift_topk(c, p, 156)))
        cases.append((f"{name} single launch", lambda c=cand, p=prev: drift.drift_topk(c, p, 156, single_launch=True)))
    return cases


def _compact_cases():
    from tokentrim.kernels import kv_compact

    cases = []
    for dtype in (torch.bfloat16,):
        kv = torch.empty(2, 2, 1, 21 * TOKENS_PER_FRAME, HEADS, HEAD_DIM, dtype=dtype)
        keep = torch.ones(1, kv.shape[3], dtype=torch.bool)
        kv_len = torch.full((1,), kv.shape[3], dtype=torch.int32)
        cases.append(("bf16 cache", lambda kv=kv, m=keep, n=kv_len: kv_compact.compact_kv(kv, m, n)))
    return cases


CASES: dict[str, Callable[[], list]] = {
    "masked_attention": lambda: _attention_cases() + _attention_fp32_cases(),
    "drift": _drift_cases,
    "kv_compact": _compact_cases,
}


def run(only: list[str] | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Compile the cases of the modules in ``only`` (all by default); with ``shard=(i, n)`` only
    every n-th case starting at i (so n processes can share the work)."""
    rec = _Recorder()
    _install(rec)
    n = 0
    for module, make in CASES.items():
        if only and module not in only:
            continue
        for label, call in make():
            if n % shard[1] == shard[0]:
                rec.case = f"{module}: {label}"
                call()
            n += 1
    return rec.records


def problems(records: list[dict]) -> list[str]:
    """What the gate refuses: spills, shared memory over the limit, attention without wgmma."""
    out = []
    for r in records:
        where = f"{r['case']} / {r['kernel']} (warps {r['num_warps']}, stages {r['num_stages']}, {r['constexprs']})"
        fp32_only = "tests only" in r["case"]
        if (r["spill_stores"] or r["spill_loads"]) and not fp32_only:
            out.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r["shared_bytes"] > SMEM_LIMIT:
            out.append(f"{where}: shared memory {r['shared_bytes']} B > {SMEM_LIMIT} B")
        if r["kernel"] == "_masked_attn_fwd" and not fp32_only and not r["wgmma"]:
            out.append(f"{where}: no wgmma in the PTX")
    return out


def format_table(records: list[dict]) -> str:
    head = f"{'case':34} {'kernel':22} {'cfg':28} {'warps':>5} {'stg':>3} {'regs':>4} {'spill st/ld':>11} {'smem KB':>7} wgmma"
    lines = [head, "-" * len(head)]
    for r in records:
        cfg = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        lines.append(
            f"{r['case'][:34]:34} {r['kernel'][:22]:22} {cfg[:28]:28} {r['num_warps']:>5} {r['num_stages']:>3} "
            f"{r['registers'] or 0:>4} {str(r['spill_stores']) + '/' + str(r['spill_loads']):>11} "
            f"{r['shared_bytes'] / 1024:>7.1f} {'yes' if r['wgmma'] else 'no'}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/aot.py",
        description="Compile every tokentrim Triton kernel for sm_90a (Hopper) without a GPU and report "
        "registers, spills, shared memory and wgmma use per autotune config.",
    )
    p.add_argument("--json", type=str, default=None, help="also write the records to this JSON file")
    p.add_argument("--only", type=str, default=None, help=f"comma-separated modules among {', '.join(CASES)}")
    p.add_argument("--shard", type=str, default="0/1", help="I/N: compile only every N-th case starting at I")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when the gate finds a problem")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    if only:
        unknown = [m for m in only if m not in CASES]
        if unknown:
            p.error(f"--only: unknown module(s) {unknown}; choose among {list(CASES)}")
    try:
        i, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        p.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    t0 = time.perf_counter()
    records = run(only, (i, n))
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90a, {len(records)} compiles "
          f"in {time.perf_counter() - t0:.1f} s")
    print(format_table(records))
    bad = problems(records)
    for b in bad:
        print("GATE:", b)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "records": records,
                       "problems": bad}, f, indent=1)
    return 1 if (bad and not args.no_fail) else 0


if __name__ == "__main__":
    sys.exit(main())
