"""Hopper readiness of the masked-attention kernel v2, checked on CPU (``pytest -m aot``).

``tests/test_aot.py`` (bench/aot.py) compiles every autotune config through the launcher at the
Wan shapes, unsplit (a CPU launch never splits). This adds the variants it cannot reach: split-KV
(SPLITS=2) on every config (``GPU_CONFIGS``), D=64, and the split merge kernel; each must use wgmma
(attention) and spill nothing. The compiles need the interpreter off, so the test runs this file
as a script in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PTRS = {"Q": "bf16", "K": "bf16", "V": "bf16", "O": "bf16", "OS": "fp32", "LSE": "fp32",
        "KV_LEN": "i32", "TILES": "i32", "COUNTS": "i32"}  # fmt: skip


def compile_sm90(fn, constexprs: dict, ptrs: dict, num_warps: int, num_stages: int):
    """(registers, spill bytes, shared bytes, ptx) of ``fn`` compiled for sm_90a. Pointers and
    stride arguments (``s*``) get the divisibility-16 hint a real launch specialises them with."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
        elif n == "qk_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in ptrs or n.startswith("s")}
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs
    )
    k = triton.compile(
        src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(ptx)
        cmd = [triton.knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    return regs, spills, k.metadata.shared, ptx


def variants():
    from tokentrim.kernels import masked_attention as kattn

    out = [(cfg, False, 2, 128) for cfg in kattn.GPU_CONFIGS]
    out.append((kattn.GPU_CONFIGS[0], True, 2, 64))
    return out


def run_checks() -> list[dict]:
    """Compile every variant and the merge kernel; one record each."""
    from tokentrim.kernels import masked_attention as kattn

    records = []
    for cfg, keep, splits, D in variants():
        bm, bn, warps, stages = cfg
        meta = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, FULL_N=kattn.FULL_TILE, PART_N=kattn.PART_TILE,
                    SPLITS=splits, HAS_KEEP=keep, HAS_KV_LEN=True, IEEE_DOT=False)  # fmt: skip
        regs, spills, shared, ptx = compile_sm90(kattn._masked_attn_fwd, meta, PTRS, warps, stages)
        records.append(dict(name=f"attn {cfg} keep={keep} splits={splits} D={D}", regs=regs, spills=spills,
                            shared=shared, wgmma="wgmma.mma_async" in ptx))  # fmt: skip
    ptrs = {"O": "bf16", "OS": "fp32", "LSE": "fp32"}
    regs, spills, shared, _ = compile_sm90(
        kattn._merge_splits, dict(HEAD_DIM=128, BLOCK_M=64, SPLITS=4), ptrs, num_warps=4, num_stages=1
    )
    records.append(dict(name="merge splits=4 D=128", regs=regs, spills=spills, shared=shared, wgmma=True))
    return records


@pytest.mark.aot
def test_split_kv_and_merge_compile_spill_free(tmp_path):
    out = tmp_path / "aot_attention.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())
    print("\n".join(str(r) for r in records))
    assert len(records) == len(variants()) + 1
    bad = [r for r in records if r["spills"] or not r["wgmma"] or r["shared"] > 227 * 1024]
    assert not bad, bad


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    Path(sys.argv[1]).write_text(json.dumps(run_checks()))
