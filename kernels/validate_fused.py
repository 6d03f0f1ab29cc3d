"""Input checks of the fused model ops (torch only; shared by the Triton launchers, the
references and ``tokentrim.ops``). Each raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import torch

from .validate import FLOAT_DTYPES, check_same_device, check_tensor


def check_rows(name: str, x, B: int, T: int, dim: int) -> None:
    check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES)
    if tuple(x.shape) != (B, T, dim):
        raise ValueError(f"{name} must be [B={B}, T={T}, dim={dim}], got shape {tuple(x.shape)}")
    if x.stride(2) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {x.stride()}")


def check_weight(name: str, w, dim: int) -> None:
    check_tensor(name, w, ndim=1, dtypes=FLOAT_DTYPES)
    if w.shape[0] != dim or w.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous [dim={dim}] vector, got shape {tuple(w.shape)}")


def check_out_dtype(out_dtype) -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, float16, bfloat16, got {out_dtype!r}")


def check_layer(layer, L: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
        raise ValueError(f"layer must be an int in [0, {L}), got {layer!r}")


def check_kv_buffer(kv, B: int, *, dim: int | None = None, hd: tuple[int, int] | None = None,
                    min_len: int | None = None) -> tuple[int, int, int]:
    """kv: a float [layers, 2, B, C, H, D] cache buffer with contiguous (H, D), and C >= min_len,
    H*D = dim and (H, D) = hd where given. Returns (layers, H, D)."""
    check_tensor("kv", kv, ndim=6, dtypes=FLOAT_DTYPES)
    L, two, Bk, C, H, D = kv.shape
    if (two != 2 or Bk != B or (min_len is not None and C < min_len) or kv.stride(-1) != 1 or kv.stride(-2) != D
            or (dim is not None and H * D != dim) or (hd is not None and (H, D) != hd)):
        c = "C" if min_len is None else f">= L={min_len}"
        heads = "H, D" if hd is None else f"H={hd[0]}, D={hd[1]}"
        prod = "" if dim is None else f" H*D = dim={dim} and"
        raise ValueError(
            f"kv must be [layers, 2, B={B}, {c}, {heads}] with{prod} contiguous (H, D), got "
            f"shape {tuple(kv.shape)} strides {kv.stride()}"
        )
    return L, H, D


def check_rope_tables(cos, sin, rows: str, n: int, D: int) -> None:
    """cos and sin: [n, D/2] fp32 tables, stride 1 last, shared strides; ``rows`` names n in messages."""
    if D % 2:
        raise ValueError(f"head dim D must be even for RoPE, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=(torch.float32,))
        if tuple(t.shape) != (n, D // 2) or t.stride(1) != 1:
            raise ValueError(f"{name} must be a [{rows}={n}, D/2={D // 2}] fp32 table with stride 1, got {tuple(t.shape)}")
    if sin.stride(0) != cos.stride(0):
        raise ValueError(f"cos and sin must share strides, got {cos.stride()} and {sin.stride()}")


def check_qk_norm_rope_inputs(q, k, v, wq, wk, cos, sin, kv, layer, start, k_raw, n_raw) -> tuple:
    """Validate ``qk_norm_rope`` inputs; return (B, T, dim, H, D)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    B, T, dim = q.shape
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rows(name, x, B, T, dim)
    check_weight("wq", wq, dim)
    check_weight("wk", wk, dim)
    L, H, D = check_kv_buffer(kv, B, dim=dim)
    check_layer(layer, L)
    check_rope_tables(cos, sin, "T", T, D)
    check_tensor("start", start, ndim=1, dtypes=(torch.int32, torch.int64))
    if start.shape[0] != B:
        raise ValueError(f"start must be [B={B}], got shape {tuple(start.shape)}")
    if isinstance(n_raw, bool) or not isinstance(n_raw, int) or not 0 <= n_raw <= T:
        raise ValueError(f"n_raw must be an int in [0, T={T}], got {n_raw!r}")
    if k_raw is not None:
        check_tensor("k_raw", k_raw, ndim=4, dtypes=FLOAT_DTYPES)
        if (k_raw.shape[0] != B or k_raw.shape[1] < n_raw or tuple(k_raw.shape[2:]) != (H, D)
                or k_raw.stride(2) != D or k_raw.stride(3) != 1):
            raise ValueError(
                f"k_raw must be [B={B}, >= n_raw={n_raw}, H={H}, D={D}] with contiguous (H, D), got {tuple(k_raw.shape)}"
            )
    check_same_device(q=q, k=k, v=v, wq=wq, wk=wk, cos=cos, sin=sin, kv=kv, start=start, k_raw=k_raw)
    return B, T, dim, H, D


def check_rms_norm_inputs(x, w, out_dtype) -> int:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    dim = x.shape[-1]
    check_weight("w", w, dim)
    if dim % 2:
        raise ValueError(f"the last dim of x must be even, got {dim}")
    check_out_dtype(out_dtype)
    if w.device != x.device:
        raise ValueError(f"w is on {w.device} but x is on {x.device}")
    return dim


def check_vec(name: str, pair, B: int, F: int, dim: int, device) -> None:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"{name} must be a pair (table [dim], per-frame [B, F, dim]), got {type(pair).__name__}")
    t, e = pair
    check_tensor(f"{name} table", t, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor(f"{name} per-frame", e, ndim=3, dtypes=FLOAT_DTYPES)
    if t.shape[0] != dim or t.stride(0) != 1:
        raise ValueError(f"{name} table must be a contiguous [dim={dim}] vector, got shape {tuple(t.shape)}")
    if tuple(e.shape) != (B, F, dim) or e.stride(2) != 1:
        raise ValueError(f"{name} per-frame must be [B={B}, F={F}, dim={dim}] with stride 1 last, got {tuple(e.shape)}")
    if t.device != device or e.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device} and {e.device}")


def check_ln_inputs(x, y, gate, weight, bias, shift, scale, out_dtype) -> None:
    """Validate ``residual_ln_modulate`` / ``ln_modulate`` inputs (y None for the latter)."""
    check_tensor("x", x, ndim=4, dtypes=(torch.float32,))
    B, F, S, dim = x.shape
    if y is not None:
        check_tensor("y", y, ndim=4, dtypes=FLOAT_DTYPES)
        if y.shape != x.shape:
            raise ValueError(f"y must have x's shape {list(x.shape)}, got {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if gate is not None and y is None:
        raise ValueError("gate needs y (the gated residual branch)")
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together")
    for name, p in (("gate", gate), ("shift", shift), ("scale", scale)):
        if p is not None:
            check_vec(name, p, B, F, dim, x.device)
    if weight is not None:
        for name, w in (("weight", weight), ("bias", bias)):
            check_weight(name, w, dim)
            if w.device != x.device:
                raise ValueError(f"{name} is on {w.device} but x is on {x.device}")
    check_out_dtype(out_dtype)


def check_rope_into_inputs(x, cos, sin, kv, layer) -> tuple:
    """Validate ``rope_into`` inputs; return (B, L, H, D)."""
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    B, L, H, D = x.shape
    if x.stride(3) != 1 or x.stride(2) != D:
        raise ValueError(f"x must have contiguous (H, D) dims, got strides {x.stride()}")
    check_layer(layer, check_kv_buffer(kv, B, hd=(H, D), min_len=L)[0])
    check_rope_tables(cos, sin, "L", L, D)
    check_same_device(x=x, cos=cos, sin=sin, kv=kv)
    return B, L, H, D
