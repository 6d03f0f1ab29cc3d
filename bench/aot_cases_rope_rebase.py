"""Hopper compile-gate cases of the RoPE re-base kernel (kernels/rope_rebase.py).

The launcher is called on CPU tensors shaped like a Wan2.1-1.3B KV cache's keys ([layers, B,
21 frames x 1560 tokens, 12 heads, 128]; 2 layers: the layer count does not change the compiled
kernel) in bf16, fp16 and fp32, with a device-side delta. For ``bench/aot.py``: nothing is
launched there, only compiled (registers, spills, shared memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TOKENS, HEADS, HEAD_DIM = 21 * 1560, 12, 128


def _cases() -> list[tuple[str, Callable[[], object]]]:
    from tokentrim.kernels import rope_rebase as k

    delta = torch.tensor(-1023, dtype=torch.int64)
    cases = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        kv = torch.empty(2, 2, 1, TOKENS, HEADS, HEAD_DIM, dtype=dt)
        name = str(dt).replace("torch.", "")
        cases.append((f"{name} K cache", lambda kv=kv: k.rope_rebase_(kv[:, 0], delta)))
    return cases


CASES: dict[str, Callable[[], list]] = {"rope_rebase": _cases}
