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
The cases live in ``bench/aot_cases*.py`` (each a ``CASES`` dict: kernels module -> cases); every
module of ``kernels/`` that defines a ``@triton.jit`` kernel must have one
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
        src = jit.ASTSource(jit, signature, constexprs, attrs)
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
                for k, v in constexprs.items()
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


def all_cases() -> dict[str, Callable[[], list]]:
    """module name in kernels/ -> cases, merged from every ``bench/aot_cases*.py`` (each defines
    ``CASES``; a new kernel module adds its cases in such a file)."""
    import importlib
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if str(here.parent) not in sys.path:
        sys.path.insert(0, str(here.parent))
    merged: dict[str, Callable[[], list]] = {}
    for f in sorted(here.glob("aot_cases*.py")):
        mod = importlib.import_module(f"bench.{f.stem}")
        for name, make in mod.CASES.items():
            if name in merged:
                raise RuntimeError(f"aot: kernels module {name!r} has cases in two files")
            merged[name] = make
    return merged


def run(only: list[str] | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Compile the cases of the modules in ``only`` (all by default); with ``shard=(i, n)`` only
    every n-th case starting at i (so n processes can share the work)."""
    rec = _Recorder()
    _install(rec)
    n = 0
    for module, make in all_cases().items():
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
    cases = all_cases()
    p.add_argument("--only", type=str, default=None, help=f"comma-separated modules among {', '.join(cases)}")
    p.add_argument("--shard", type=str, default="0/1", help="I/N: compile only every N-th case starting at I")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when the gate finds a problem")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    if only:
        unknown = [m for m in only if m not in cases]
        if unknown:
            p.error(f"--only: unknown module(s) {unknown}; choose among {list(cases)}")
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
