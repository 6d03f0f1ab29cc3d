"""Hopper readiness of the masked-attention kernel v2, checked on CPU (``pytest -m aot``).

Every autotune config the launcher can pick (``GPU_CONFIGS``) is compiled for sm_90a with the
bundled ptxas, in the variants that stress registers (D=128, keep and dense paths, split-KV), and
must use wgmma and spill nothing; the split merge kernel too. Needs real Triton compilation, so
it runs only with the interpreter off (``TRITON_INTERPRET=0 pytest -m aot``); under the
interpreter the kernels are Python functions and the module is skipped.
"""

from __future__ import annotations

import re
import subprocess
import tempfile

import pytest

from tokentrim.kernels import masked_attention as kattn

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(kattn._INTERPRET, reason="needs TRITON_INTERPRET=0 (compiles for sm_90a)"),
]

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


VARIANTS = [(cfg, keep, 1, 128) for cfg in kattn.GPU_CONFIGS for keep in (True, False)]
VARIANTS += [(cfg, False, 2, 128) for cfg in kattn.GPU_CONFIGS[:1]] + [(kattn.GPU_CONFIGS[0], True, 1, 64)]


@pytest.mark.parametrize("cfg,keep,splits,D", VARIANTS)
def test_attention_configs_compile_spill_free(cfg, keep, splits, D):
    bm, bn, warps, stages = cfg
    meta = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, FULL_N=kattn.FULL_TILE, PART_N=kattn.PART_TILE,
                SPLITS=splits, HAS_KEEP=keep, HAS_KV_LEN=True, IEEE_DOT=False)  # fmt: skip
    regs, spills, shared, ptx = compile_sm90(kattn._masked_attn_fwd, meta, PTRS, warps, stages)
    assert spills == 0, f"{cfg} keep={keep} splits={splits} D={D}: {spills} bytes spilled ({regs} registers)"
    assert "wgmma.mma_async" in ptx
    assert shared <= 227 * 1024


def test_merge_kernel_compiles_spill_free():
    ptrs = {"O": "bf16", "OS": "fp32", "LSE": "fp32"}
    regs, spills, _, _ = compile_sm90(
        kattn._merge_splits, dict(HEAD_DIM=128, BLOCK_M=64, SPLITS=4), ptrs, num_warps=4, num_stages=1
    )
    assert spills == 0
