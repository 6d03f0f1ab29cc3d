"""Hopper compile-gate cases of the core kernels (drift, masked attention, KV compaction).

Each case calls a real launcher of ``tokentrim.kernels`` on CPU tensors of the Wan2.1-1.3B shapes
(832x480: 1560 tokens per latent frame, 12 heads of 128); ``bench/aot.py`` turns every launch into
sm_90a compiles (one per autotune config) without running anything. Only dtype, strides and
alignment of the tensors matter. Importing this module has no side effect.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


