"""In-place, stable compaction of the kept tokens of a KV cache, all layers in one launch.

``compact_kv(kv, keep, kv_len) -> new_len``: kv [..., B, L, H, D] (e.g. [layers, 2, B, L, H, D]),
keep [B, L] bool, kv_len [B] int32/int64. For every leading index and video b, the tokens j < kv_len[b]
with keep[b, j] move to the front in their original order; new_len[b] is their count (int32).
Slots at or past new_len[b] keep stale values.

Two steps, no host sync (graph-safe):
1. setup (torch): ``dest = cumsum(valid) - 1`` over each video's tokens, valid = keep & (j < kv_len);
   new_len = the last cumsum entry.
2. one kernel launch (the leading dims' element offsets are a tiny [G] int64 table), one program per (leading index, video, head) walking its tokens tile after
   tile. A token only moves down (dest <= source), and the destinations of a tile never exceed its
   last source row, so reading a whole tile before writing it is race-free: the next tile only
   reads rows past this one. A barrier sits between a tile's load and its store, because another
   thread of the program may store into a row of the same tile that this thread has yet to read. Tokens already
   in place are neither read nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import INTERPRET
from .validate import check_compact_inputs


@triton.jit
def _compact_kernel(
    KV, LEAD_OFF, DEST, KV_LEN,
    s_b, s_l, s_h, s_dest_b,
    B, H, L, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    gb = pid // H
    b = (gb % B).to(tl.int64)
    g = gb // B
    base = KV + tl.load(LEAD_OFF + g) + b * s_b + h * s_h
    n = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), L).to(tl.int32)
    offs_l0 = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for t in range(0, tl.cdiv(n, BLOCK_L)):
        offs_l = t * BLOCK_L + offs_l0
        in_len = offs_l < n
        # DEST holds cumsum(valid): for a kept token its destination is DEST - 1; a token moves
        # iff it is kept and an earlier token was dropped.
        cs = tl.load(DEST + b * s_dest_b + offs_l, mask=in_len, other=0)
        cs_prev = tl.load(DEST + b * s_dest_b + offs_l - 1, mask=in_len & (offs_l > 0), other=0)
        dest = cs - 1
        move = in_len & (cs > cs_prev) & (dest != offs_l)
        m2 = move[:, None] & d_ok[None, :]
        x = tl.load(base + offs_l.to(tl.int64)[:, None] * s_l + offs_d[None, :], mask=m2, other=0.0)
        tl.debug_barrier()
        tl.store(base + dest.to(tl.int64)[:, None] * s_l + offs_d[None, :], x, mask=m2)


def compact_kv(kv: torch.Tensor, keep: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
    """Move kept tokens (j < kv_len[b] and keep[b, j]) to the front of every leading slice, in place.

    Args:
        kv: [..., B, L, H, D] bf16/fp16/fp32, any strides with a contiguous last dim.
        keep: [B, L] bool, True = keep.
        kv_len: [B] int32/int64, tokens in use per video (clamped to [0, L]).

    Returns:
        new_len [B] int32 on kv's device. Host sync: none.
    """
    check_compact_inputs(kv, keep, kv_len)
    B, L, H, D = kv.shape[-4:]
    if D > 1 and kv.stride(-1) != 1:
        raise ValueError(f"kv must have a contiguous last dimension, got strides {kv.stride()}")
    valid = keep & (torch.arange(L, device=kv.device)[None, :] < kv_len[:, None])
    cs = torch.cumsum(valid, dim=1, dtype=torch.int32)
    new_len = cs[:, -1].clone() if L > 0 else torch.zeros(B, dtype=torch.int32, device=kv.device)
    if kv.numel() == 0:
        return new_len
    # Element offset of every leading index (e.g. each (layer, k/v)), so any leading strides work.
    lead_off = torch.zeros((), dtype=torch.int64, device=kv.device)
    for n, st in zip(kv.shape[:-4], kv.stride()[:-4]):
        lead_off = lead_off[..., None] + torch.arange(n, dtype=torch.int64, device=kv.device) * st
    lead_off = lead_off.reshape(-1)
    G = lead_off.numel()

    # 32 tokens x 128 dims per step: 64 spilled 16 bytes at 4 warps in the sm_90a compile (bench/aot.py)
    block_l = 16 if INTERPRET else 32
    block_d = triton.next_power_of_2(D)
    _compact_kernel[(G * B * H,)](
        kv, lead_off, cs, kv_len,
        kv.stride(-4), kv.stride(-3), kv.stride(-2), cs.stride(0),
        B, H, L, D,
        BLOCK_L=block_l, BLOCK_D=block_d,
        num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return new_len


__all__ = ["compact_kv"]
