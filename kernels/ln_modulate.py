"""Fused (gated residual +) LayerNorm + adaLN modulate + cast, one program per token row.

``residual_ln_modulate(x, y, gate, weight, bias, shift, scale, eps, out_dtype) -> (x_new, out)``:

    x_new = x + gate * y          (x fp32 [B, F, S, dim]; y [B, F, S, dim] any float dtype;
                                   gate optional: then x_new = x + y)
    n     = LayerNorm(x_new) (* weight + bias when given)      (fp32, no affine when weight is None)
    out   = (n * (1 + scale) + shift).to(out_dtype)            (modulation optional)

``ln_modulate(x, weight, bias, shift, scale, eps, out_dtype) -> out`` is the same without the residual.

Modulation vectors are per (video, frame) and given as a pair (table [dim] fp32, per-frame
[B, F, dim] fp32 view, any strides with a contiguous last dim): the vector is table + per-frame,
so the model passes its modulation parameter row and the time-projection slice without adding
them first (e.g. gate = (block.modulation[0, 2], e0[:, :, 2])). Everything is computed in fp32.
Host syncs: none. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import as_rows, row_warps
from .validate_fused import check_ln_inputs


@triton.jit
def _mod_vec(T_ptr, E_ptr, se_b, se_f, b, f, offs, mask):
    t = tl.load(T_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(E_ptr + b * se_b + f * se_f + offs, mask=mask, other=0.0).to(tl.float32)
    return t + e


@triton.jit
def _ln_mod_kernel(
    X, Y, XO, OUT, W, BIAS, GT, GE, ST, SE, CT, CE,
    sx_r, sy_r, sxo_r, so_r, sge_b, sge_f, sse_b, sse_f, sce_b, sce_f,
    S, F, dim, eps,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    m = r // S
    b = m // F
    f = m % F
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(X + r * sx_r + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y = tl.load(Y + r * sy_r + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * _mod_vec(GT, GE, sge_b, sge_f, b, f, offs, mask)
        x = x + y
        tl.store(XO + r * sxo_r + offs, x, mask=mask)
    mean = tl.sum(x, axis=0) / dim
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / dim + eps)
    n = xc * rstd
    if HAS_AFFINE:
        n = n * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD:
        scale = _mod_vec(CT, CE, sce_b, sce_f, b, f, offs, mask)
        shift = _mod_vec(ST, SE, sse_b, sse_f, b, f, offs, mask)
        n = n * (1.0 + scale) + shift
    tl.store(OUT + r * so_r + offs, n.to(OUT.dtype.element_ty), mask=mask)


def residual_ln_modulate(x, y, gate, weight, bias, shift, scale, eps: float, out_dtype: torch.dtype):
    """See the module docstring. x [B,F,S,dim] fp32; y like x (or None: no residual); gate/shift/
    scale: None or (table, per-frame) pairs (shift and scale both or neither); weight/bias: None or
    [dim]. Returns (x_new fp32 or None without y, out [B,F,S,dim] out_dtype)."""
    check_ln_inputs(x, y, gate, weight, bias, shift, scale, out_dtype)
    B, F, S, dim = x.shape
    dev = x.device
    x2 = as_rows(x)
    y2 = None if y is None else as_rows(y)
    out = torch.empty(B, F, S, dim, dtype=out_dtype, device=dev)
    xo = torch.empty(B, F, S, dim, dtype=torch.float32, device=dev) if y is not None else None
    R = B * F * S
    if R == 0:
        return xo, out
    o2 = out.view(R, dim)
    xo2 = xo.view(R, dim) if xo is not None else o2
    z = x2  # placeholder pointer for absent operands (never read: the constexpr flags are off)
    gt, ge = gate if gate is not None else (z, x)
    st, se = shift if shift is not None else (z, x)
    ct, ce = scale if scale is not None else (z, x)
    _ln_mod_kernel[(R,)](
        x2, y2 if y2 is not None else z, xo2, o2,
        weight if weight is not None else z, bias if bias is not None else z,
        gt, ge, st, se, ct, ce,
        x2.stride(0), y2.stride(0) if y2 is not None else 0, xo2.stride(0), o2.stride(0),
        ge.stride(0), ge.stride(1), se.stride(0), se.stride(1), ce.stride(0), ce.stride(1),
        S, F, dim, float(eps),
        BLOCK=triton.next_power_of_2(dim), HAS_RES=y is not None, HAS_GATE=gate is not None,
        HAS_AFFINE=weight is not None, HAS_MOD=shift is not None,
        num_warps=row_warps(dim),
    )  # fmt: skip
    return xo, out


def ln_modulate(x, weight, bias, shift, scale, eps: float, out_dtype: torch.dtype):
    """LayerNorm (+ affine) + modulate + cast of x [B,F,S,dim] fp32 (no residual). Returns out."""
    return residual_ln_modulate(x, None, None, weight, bias, shift, scale, eps, out_dtype)[1]


__all__ = ["ln_modulate", "residual_ln_modulate"]
