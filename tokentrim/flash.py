"""Optional flash-attn backend of ``tokentrim.ops.masked_attention`` (``backend="flash-attn"``).

Runs a dense or compacted cache through ``flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache,
cache_seqlens=kv_len)``: the lengths stay a device tensor, so the call is graph-safe. flash-attn
has no per-key mask, so ``keep`` must be None (compact the cache first: ``ops.compact_kv`` /
``KVCache.compact``, the default after a prune when masks persist). Only on CUDA, fp16/bf16, when the
``flash_attn`` package is importable; ``tokentrim.ops`` raises otherwise, saying why.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

PACKAGE = "flash_attn"


@functools.cache
def available() -> bool:
    """True when the flash_attn package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec(PACKAGE) is not None


def masked_attention(q, k, v, keep=None, kv_len=None, scale=None):
    """o [B,Lq,H,D] = attention of q over k/v[:, :kv_len[b]] (all Lk_max keys when kv_len is None).

    q [B,Lq,H,D], k/v [B,Lk_max,H,D] fp16/bf16 CUDA, last dim contiguous; kv_len [B] int (clamped
    to [0, Lk_max] on the device); a video with kv_len 0 gets zeros. Host sync: none.
    """
    if keep is not None:
        raise ValueError(
            "backend='flash-attn' attends dense or compacted caches only: keep must be None (compact "
            "the cache first with ops.compact_kv / KVCache.compact), got a keep mask"
        )
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"backend='flash-attn' needs float16 or bfloat16 q/k/v, got {q.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension for flash-attn, got strides {x.stride()}")
    from flash_attn import flash_attn_with_kvcache

    D = q.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    if kv_len is None:
        return flash_attn_with_kvcache(q, k, v, softmax_scale=scale)
    seqlens = kv_len.clamp(0, k.shape[1]).to(torch.int32)
    o = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, softmax_scale=scale)
    return o.masked_fill_((seqlens == 0)[:, None, None, None], 0.0)  # o is fresh: no second output
