"""Fused q/k RMSNorm across heads + 3D RoPE + cast, writing K (and V) straight into a KV-cache slot.

``qk_norm_rope(q, k, v, wq, wk, cos, sin, eps, kv, layer, start, k_raw=None, n_raw=0)`` for the
T tokens of a block (one program per (video, token), the whole row of dim = H*D channels):

- q, k, v: [B, T, dim] projections (bf16/fp16/fp32, last dim contiguous), wq/wk [dim] fp32;
- RMSNorm over all dim channels in fp32 (x * rsqrt(mean(x^2) + eps) * w, one rounding at the end);
- RoPE on interleaved pairs (channels 2j, 2j+1) with cos/sin [T, D/2] fp32 (pair j % (D/2) of
  its head); q_rot is returned [B, T, H, D] in the cache dtype;
- k_rot and v are cast to the cache dtype and written into ``kv[layer, 0/1, b, start[b] + t]``
  (kv [layers, 2, B, C, H, D], start [B] int32/int64 device tensor: no host sync, graph-safe);
- with ``k_raw`` ([B, >= n_raw, H, D]) the normed, un-rotated keys of tokens t < n_raw are written
  there too (Rolling Forcing's raw sink).

``rms_norm(x, w, eps, out_dtype)`` is the same kernel without RoPE and cache: [..., dim] -> out_dtype.
``rope_into(x, cos, sin, kv, layer)``: RoPE only, x [B, L, H, D] rotated into kv[layer, 0, :, :L]
(Rolling Forcing's raw sink re-rotated in front of the working cache every forward).

Host syncs: none. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import as_rows, row_warps
from .validate_fused import check_qk_norm_rope_inputs, check_rms_norm_inputs, check_rope_into_inputs


@triton.jit
def _norm_pairs(ptr, w_ptr, offs, mask, dim, eps):
    """Load a row as interleaved pairs [HALF, 2] and return its fp32 RMS-normed halves x0, x1."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / dim + eps)
    return tl.split(x * rstd * w)


@triton.jit
def _rotate_store(ptr, x0, x1, c, s, offs, mask):
    y = tl.join(x0 * c - x1 * s, x0 * s + x1 * c)
    tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_pairs(COS, SIN, scos_t, T, dim, HALF_D: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """This program's (video b, token t), its row as interleaved pairs (offsets [BLOCK_HALF, 2] and
    mask) and the pairs' RoPE cos/sin [BLOCK_HALF] fp32 (1 and 0 without RoPE)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    j = tl.arange(0, BLOCK_HALF)
    pair_ok = j < dim // 2
    offs = j[:, None] * 2 + tl.arange(0, 2)[None, :]
    mask = pair_ok[:, None] & (offs < dim)
    if HAS_ROPE:
        p = j % HALF_D
        c = tl.load(COS + t * scos_t + p, mask=pair_ok, other=1.0)
        s = tl.load(SIN + t * scos_t + p, mask=pair_ok, other=0.0)
    else:
        c = tl.full([BLOCK_HALF], 1.0, tl.float32)
        s = tl.zeros([BLOCK_HALF], tl.float32)
    return b, t, offs, mask, c, s


@triton.jit
def _qk_norm_rope_kernel(
    Q, K, V, WQ, WK, COS, SIN, QO, KV_K, KV_V, START, KRAW,
    sq_b, sq_t, sk_b, sk_t, sv_b, sv_t, sqo_b, sqo_t,
    skv_b, skv_t, sraw_b, sraw_t, scos_t,
    T, dim, eps, n_raw,
    HALF_D: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_KV: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_RAW: tl.constexpr,
):  # fmt: skip
    b, t, offs, mask, c, s = _row_pairs(COS, SIN, scos_t, T, dim, HALF_D, BLOCK_HALF, HAS_ROPE)
    q0, q1 = _norm_pairs(Q + b * sq_b + t * sq_t, WQ, offs, mask, dim, eps)
    _rotate_store(QO + b * sqo_b + t * sqo_t, q0, q1, c, s, offs, mask)
    if HAS_KV:
        row = (tl.load(START + b).to(tl.int64) + t) * skv_t + b * skv_b
        k0, k1 = _norm_pairs(K + b * sk_b + t * sk_t, WK, offs, mask, dim, eps)
        _rotate_store(KV_K + row, k0, k1, c, s, offs, mask)
        if HAS_RAW:
            if t < n_raw:
                raw = tl.join(k0, k1)
                tl.store(KRAW + b * sraw_b + t * sraw_t + offs, raw.to(KRAW.dtype.element_ty), mask=mask)
        v = tl.load(V + b * sv_b + t * sv_t + offs, mask=mask, other=0.0)
        tl.store(KV_V + row + offs, v.to(KV_V.dtype.element_ty), mask=mask)


@triton.jit
def _rope_into_kernel(
    X, COS, SIN, OUT, sx_b, sx_t, so_b, so_t, scos_t, T, dim,
    HALF_D: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    b, t, offs, mask, c, s = _row_pairs(COS, SIN, scos_t, T, dim, HALF_D, BLOCK_HALF, True)
    x = tl.load(X + b * sx_b + t * sx_t + offs, mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(x)
    _rotate_store(OUT + b * so_b + t * so_t, x0, x1, c, s, offs, mask)


def qk_norm_rope(q, k, v, wq, wk, cos, sin, eps: float, kv, layer: int, start, k_raw=None, n_raw: int = 0):
    """See the module docstring. Returns q_rot [B, T, H, D] in kv's dtype; writes kv (and k_raw)."""
    B, T, dim, H, D = check_qk_norm_rope_inputs(q, k, v, wq, wk, cos, sin, kv, layer, start, k_raw, n_raw)
    qo = torch.empty(B, T, H, D, dtype=kv.dtype, device=q.device)
    if qo.numel() == 0:
        return qo
    kk, vv = kv[layer, 0], kv[layer, 1]
    raw = k_raw if (k_raw is not None and n_raw > 0) else None
    _qk_norm_rope_kernel[(B * T,)](
        q, k, v, wq, wk, cos, sin, qo, kk, vv, start, raw if raw is not None else qo,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), qo.stride(0), qo.stride(1),
        kk.stride(0), kk.stride(1), raw.stride(0) if raw is not None else 0, raw.stride(1) if raw is not None else 0,
        cos.stride(0), T, dim, float(eps), int(n_raw),
        HALF_D=D // 2, BLOCK_HALF=triton.next_power_of_2(max(dim // 2, 1)),
        HAS_KV=True, HAS_ROPE=True, HAS_RAW=raw is not None, num_warps=row_warps(dim),
    )  # fmt: skip
    return qo


def rope_into(x, cos, sin, kv, layer: int):
    """Rotate x [B, L, H, D] (Rolling Forcing's raw sink keys) by cos/sin [L, D/2] fp32 and write the
    result into the first L slots of kv[layer, 0] (kv [layers, 2, B, C, H, D]). Host sync: none."""
    B, L, H, D = check_rope_into_inputs(x, cos, sin, kv, layer)
    if B * L == 0:
        return
    out = kv[layer, 0]
    _rope_into_kernel[(B * L,)](
        x, cos, sin, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), L, H * D,
        HALF_D=D // 2, BLOCK_HALF=triton.next_power_of_2(max(H * D // 2, 1)), num_warps=row_warps(H * D),
    )  # fmt: skip


def rms_norm(x, w, eps: float, out_dtype: torch.dtype):
    """RMSNorm of x [..., dim] over its last dim in fp32, times w [dim], cast to out_dtype (one rounding)."""
    dim = check_rms_norm_inputs(x, w, out_dtype)
    x2 = as_rows(x)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    R = x2.shape[0]
    if R == 0:
        return out
    o2 = out.view(R, dim)
    _qk_norm_rope_kernel[(R,)](
        x2, x2, x2, w, w, w, w, o2, o2, o2, o2, o2,
        0, x2.stride(0), 0, 0, 0, 0, 0, o2.stride(0),
        0, 0, 0, 0, 0, R, dim, float(eps), 0,
        HALF_D=1, BLOCK_HALF=triton.next_power_of_2(max(dim // 2, 1)),
        HAS_KV=False, HAS_ROPE=False, HAS_RAW=False, num_warps=row_warps(dim),
    )  # fmt: skip
    return out


__all__ = ["qk_norm_rope", "rms_norm", "rope_into"]
