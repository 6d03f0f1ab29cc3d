"""Forward-only flash attention over the kept keys of a cache-layout K/V buffer.

``masked_attention(q, k, v, keep=None, kv_len=None, scale=None)``: q [B,Lq,H,D], k/v [B,Lk_max,H,D]
(read in place through their strides, e.g. views of a [layers, 2, B, L, H, D] cache), ``keep``
[B,Lk_max] bool (True = attend), ``kv_len`` [B] int32/int64 device tensor (keys at or past kv_len[b]
are ignored). Online softmax in fp32; the output [B,Lq,H,D] has q's dtype; a query row with no
attended key is all zeros.

Skipping: keys are processed in tiles of ``BLOCK_N``. Without ``keep`` a program's loop bound is
``cdiv(kv_len[b], BLOCK_N)``, read from device memory. With ``keep`` the launcher first builds, with
a few small torch ops and no host sync, the list of tiles holding at least one attended key
(``tiles[b, :count[b]]``, ascending); the kernel loops over that list only, so a fully pruned tile
(or one past kv_len) costs nothing, not even a branch, and the loop body stays a straight line
that the compiler can software-pipeline. Pruned keys inside a listed tile get -inf from the keep bits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .validate import check_attention_inputs, check_kv_len_range

HEAD_DIMS = (64, 128)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_LOG2E = 1.4426950408889634


def tile_size() -> int:
    """Key tile length BLOCK_N used for skipping (smaller under the interpreter to keep tests fast)."""
    return 16 if _INTERPRET else 64


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16}, num_warps=1, num_stages=1)]
    # sm_90a review compile (bench/aot.py): BLOCK_M 128 with 4 warps spills 100-230 bytes (the
    # [128, 128] fp32 accumulator alone is 128 registers per thread), so BLOCK_M 128 runs 8 warps.
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm, w, s in [(64, 4, 2), (64, 4, 3), (128, 8, 3), (128, 8, 4)]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """fp32 inputs (IEEE dot) exist for tests: one small config that fits in shared memory."""
    if kwargs.get("IEEE_DOT", named_args.get("IEEE_DOT")):
        return [c for c in configs if c.kwargs.get("BLOCK_M") == 64 and c.num_stages <= 2] or configs[:1]
    return configs


@triton.autotune(
    configs=_configs(),
    key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_KEEP", "IEEE_DOT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _masked_attn_fwd(
    Q, K, V, O, KEEP, KV_LEN, TILES, TILE_COUNT,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sob, sol, soh,
    skeep_b, stiles_b,
    Lq, Lk, H, qk_scale,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_KV_LEN: tl.constexpr, IEEE_DOT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq

    q_ptrs = Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    if HAS_KV_LEN:
        kvl = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), Lk).to(tl.int32)
    else:
        kvl = Lk
    if HAS_KEEP:
        n_iter = tl.load(TILE_COUNT + b)
    else:
        n_iter = tl.cdiv(kvl, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for i in range(0, n_iter):
        if HAS_KEEP:
            tile = tl.load(TILES + b * stiles_b + i)
        else:
            tile = i
        offs_n = tile * BLOCK_N + offs_n0
        in_len = offs_n < kvl
        offs_n64 = offs_n.to(tl.int64)
        if HAS_KEEP:
            kept = tl.load(KEEP + b * skeep_b + offs_n64, mask=in_len, other=0) != 0
            ok = in_len & kept
        else:
            ok = in_len
        # keys not attended load as 0: NaN/Inf in a masked or stale slot never enters the dots
        k = tl.load(k_base + offs_n64[None, :] * skl + offs_d[:, None], mask=ok[None, :], other=0.0)
        if IEEE_DOT:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no attended key so far has m_new = -inf; shift by 0 instead so that
        # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n64[:, None] * svl + offs_d[None, :], mask=ok[:, None], other=0.0)
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def _bucket(n: int) -> int:
    """Next power of two of n, capped: the autotune key groups similar lengths together."""
    return min(1 << max(n - 1, 0).bit_length(), 1 << 17)


def kept_tiles(keep: torch.Tensor, kv_len: torch.Tensor | None, block_n: int):
    """Tiles of ``block_n`` keys holding at least one attended key, per video.

    keep [B,Lk] bool, kv_len [B] int or None. Returns (tiles [B, cdiv(Lk,block_n)] int32 whose first
    count[b] entries are the attended tile indices in ascending order, count [B] int32).
    Host sync: none.
    """
    B, Lk = keep.shape
    n_tiles = triton.cdiv(Lk, block_n)
    mask = keep
    if kv_len is not None:
        mask = keep & (torch.arange(Lk, device=keep.device)[None, :] < kv_len[:, None])
    padded = torch.zeros(B, n_tiles * block_n, dtype=torch.bool, device=keep.device)
    padded[:, :Lk] = mask
    tile_any = padded.view(B, n_tiles, block_n).any(dim=2)
    # Stable sort of "not attended" flags puts attended tiles first, in ascending order.
    tiles = torch.sort((~tile_any).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    count = tile_any.sum(dim=1, dtype=torch.int32)
    return tiles, count


def _check_last_dim(name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}")


def masked_attention(q, k, v, keep=None, kv_len=None, scale=None, out=None, check_range: bool = False, tiles=None):
    """Flash attention of q over the attended keys of k/v (see the module docstring).

    Args:
        q: [B,Lq,H,D] bf16/fp16 (fast path), or fp32 (exact IEEE dot, one small config: meant
            for tests and the interpreter, not speed), D in {64, 128}, last dim contiguous.
        k, v: [B,Lk_max,H,D], q's dtype, any strides with a contiguous last dim.
        keep: optional [B,Lk_max] bool, True = attend (copied only if its last stride is not 1).
        kv_len: optional [B] int32/int64 on q's device; values above Lk_max are clamped in the kernel.
        scale: softmax scale (default D**-0.5).
        out: optional [B,Lq,H,D] output tensor of q's dtype (last dim contiguous), written fully.
        check_range: also check 0 <= kv_len <= Lk_max (one host sync).
        tiles: optional ``kept_tiles(keep, kv_len, tile_size())`` computed by the caller once and
            reused by every layer that attends under the same keep/kv_len (saves a sort per call).

    Returns:
        o [B,Lq,H,D] in q's dtype (``out`` when given). Host sync: none (unless check_range).
    """
    check_attention_inputs(q, k, v, keep, kv_len)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {HEAD_DIMS} for the Triton kernel, got {D}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_last_dim(name, x)
    if check_range and kv_len is not None:
        check_kv_len_range(kv_len, Lk)
    if out is None:
        out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (B, Lq, H, D) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be [{B}, {Lq}, {H}, {D}] {q.dtype} on {q.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        _check_last_dim("out", out)
    if out.numel() == 0:
        return out

    scale = D**-0.5 if scale is None else float(scale)
    block_n = tile_size()
    if keep is not None:
        if tiles is None:
            tiles, count = kept_tiles(keep, kv_len, block_n)
        else:
            tiles, count = tiles
            n_tiles = triton.cdiv(Lk, block_n)
            if tuple(tiles.shape) != (B, n_tiles) or tuple(count.shape) != (B,):
                raise ValueError(
                    f"tiles must be kept_tiles(keep, kv_len, {block_n}): ([B={B}, {n_tiles}], [B={B}]), "
                    f"got ({tuple(tiles.shape)}, {tuple(count.shape)})"
                )
        keep_arg = (keep if keep.stride(1) == 1 else keep.contiguous()).view(torch.uint8)
        skeep_b, stiles_b = keep_arg.stride(0), tiles.stride(0)
    else:
        tiles = count = keep_arg = None
        skeep_b = stiles_b = 0

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    _masked_attn_fwd[grid](
        q, k, v, out, keep_arg, kv_len, tiles, count,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        skeep_b, stiles_b,
        Lq, Lk, H, scale * _LOG2E,
        _bucket(Lq), _bucket(Lk),
        HEAD_DIM=D, BLOCK_N=block_n,
        HAS_KEEP=keep is not None, HAS_KV_LEN=kv_len is not None, IEEE_DOT=q.dtype == torch.float32,
    )  # fmt: skip
    return out


__all__ = ["masked_attention", "kept_tiles", "tile_size", "HEAD_DIMS"]
