"""The one place where tokentrim's public ops become torch.library custom ops: ``torch.ops.tokentrim.*``.

Importing this module (``import tokentrim`` does) registers, each with a fake (meta) kernel so that
``torch.compile(fullgraph=True)``, FakeTensor tracing, CUDA graphs and the meta device see ONE op:

- ``drift_topk(cand, prev, k, ph, pw, backend) -> (drift, topk_idx, severity)``
- ``attention_tiles(keep, kv_len, backend) -> (tiles, count)``: the tile plan that every
  layer's ``masked_attention`` of one forward shares (an opaque pair of int32 tensors:
  ``tokentrim.kernels.masked_attention.AttentionPlan``).
- ``masked_attention(q, k, v, keep, kv_len, scale, tiles, count, backend) -> o``
- ``compact_kv(kv!, keep, kv_len, backend) -> new_len`` (mutates ``kv`` in place)
- ``qk_norm_rope(q, k, v, wq, wk, cos, sin, eps, kv!, layer, start, k_raw!, n_raw, backend) -> q_rot``
  (writes K/V into the cache buffer ``kv`` and raw keys into ``k_raw``: declared mutated)
- ``rope_into(x, cos, sin, kv!, layer, backend)``: the raw sink re-rotated into kv[layer, 0, :, :L]
- ``rms_norm(x, w, eps, out_dtype, backend)``, ``ln_modulate(...)``, ``residual_ln_modulate(...)``

Implementation: every op calls the ``tokentrim.ops`` dispatch with its ``backend`` argument
("auto" by default), so on CUDA tensors the implementation is the Triton launcher, on CPU the
reference (or a native CPU kernel once ``ops`` prefers it for "auto"), and under
``TRITON_INTERPRET=1`` with backend "triton" the Triton kernel on CPU tensors. Outputs are always
fresh, contiguous tensors (custom ops may not return views of their inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tokentrim import ops

NAMESPACE = "tokentrim"
DEFAULT_PLAN_WIDTH = 1  # plan columns when triton is not installed (the reference ignores the plan)


def _fresh(x: Tensor, *inputs: Tensor) -> Tensor:
    """x as a contiguous tensor that shares no storage with ``inputs``."""
    if not x.is_contiguous() or any(i is not None and x.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs):
        return x.clone(memory_format=torch.contiguous_format)
    return x


# --------------------------------------------------------------------------------------- drift
@torch.library.custom_op(f"{NAMESPACE}::drift_topk", mutates_args=())
def drift_topk(cand: Tensor, prev: Tensor, k: int, ph: int, pw: int, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """``tokentrim.ops.drift_topk`` without the finite check (a host sync): drift [B,N] fp32,
    topk_idx [B,k] int64, severity [B] fp32."""
    d, i, s = ops.drift_topk(cand, prev, k, (ph, pw), backend=backend, check_finite_inputs=False)
    return _fresh(d), _fresh(i), _fresh(s)


@drift_topk.register_fake
def _(cand, prev, k, ph, pw, backend="auto"):
    B, _, _, H, W = cand.shape
    N = (H // ph) * (W // pw)
    return (
        cand.new_empty(B, N, dtype=torch.float32),
        cand.new_empty(B, k, dtype=torch.int64),
        cand.new_empty(B, dtype=torch.float32),
    )


# ----------------------------------------------------------------------------------- attention
def plan_width(lk: int) -> int:
    """Columns of the plan's ``tiles`` tensor for Lk keys (the Triton kernel's ``plan_width``)."""
    if ops.triton_available():
        return ops._kernel("masked_attention").plan_width(lk)
    return DEFAULT_PLAN_WIDTH


@torch.library.custom_op(f"{NAMESPACE}::attention_tiles", mutates_args=())
def attention_tiles(keep: Tensor, kv_len: Optional[Tensor], backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Tile plan (tiles [B, plan_width(Lk)] int32, count [B, 2] int32) for ``masked_attention``.

    Computed with the Triton kernel's ``attention_plan`` when the backend resolves to Triton; zeros
    otherwise (the reference does not use a plan). Host sync: none.
    """
    B, Lk = keep.shape
    plan = ops.attention_tiles(keep, kv_len, backend=backend)
    if plan is None:
        return keep.new_zeros(B, plan_width(Lk), dtype=torch.int32), keep.new_zeros(B, 2, dtype=torch.int32)
    return _fresh(plan[0]), _fresh(plan[1])


@attention_tiles.register_fake
def _(keep, kv_len, backend="auto"):
    B, Lk = keep.shape
    return keep.new_empty(B, plan_width(Lk), dtype=torch.int32), keep.new_empty(B, 2, dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::masked_attention", mutates_args=())
def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Optional[Tensor] = None,
    kv_len: Optional[Tensor] = None,
    scale: Optional[float] = None,
    tiles: Optional[Tensor] = None,
    count: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """``tokentrim.ops.masked_attention``: o [B,Lq,H,D] in q's dtype. ``tiles``/``count``: the plan
    from ``attention_tiles`` under the same keep/kv_len (both or neither). Host sync: none."""
    if (tiles is None) != (count is None):
        raise ValueError("tiles and count must be given together (the pair from attention_tiles)")
    plan = None if tiles is None else (tiles, count)
    o = ops.masked_attention(q, k, v, keep=keep, kv_len=kv_len, scale=scale, backend=backend, tiles=plan)
    return _fresh(o, q, k, v)


@masked_attention.register_fake
def _(q, k, v, keep=None, kv_len=None, scale=None, tiles=None, count=None, backend="auto"):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ---------------------------------------------------------------------------------- compaction
@torch.library.custom_op(f"{NAMESPACE}::compact_kv", mutates_args=("kv",))
def compact_kv(kv: Tensor, keep: Tensor, kv_len: Tensor, backend: str = "auto") -> Tensor:
    """``tokentrim.ops.compact_kv``: compacts ``kv`` in place, returns new_len [B] int32."""
    return _fresh(ops.compact_kv(kv, keep, kv_len, backend=backend), kv_len)


@compact_kv.register_fake
def _(kv, keep, kv_len, backend="auto"):
    return kv_len.new_empty(kv_len.shape, dtype=torch.int32)


# ------------------------------------------------------------------------------ fused model ops
@torch.library.custom_op(f"{NAMESPACE}::qk_norm_rope", mutates_args=("kv", "k_raw"))
def qk_norm_rope(
    q: Tensor, k: Tensor, v: Tensor, wq: Tensor, wk: Tensor, cos: Tensor, sin: Tensor, eps: float,
    kv: Tensor, layer: int, start: Tensor, k_raw: Optional[Tensor] = None, n_raw: int = 0, backend: str = "auto",
) -> Tensor:
    """``tokentrim.ops.qk_norm_rope``: returns q_rot [B,T,H,D]; writes K/V (and raw K) into ``kv``/``k_raw``."""
    return ops.qk_norm_rope(q, k, v, wq, wk, cos, sin, eps, kv, layer, start, k_raw, n_raw, backend=backend)


@qk_norm_rope.register_fake
def _(q, k, v, wq, wk, cos, sin, eps, kv, layer, start, k_raw=None, n_raw=0, backend="auto"):
    B, T, _ = q.shape
    return q.new_empty(B, T, kv.shape[-2], kv.shape[-1], dtype=kv.dtype)


@torch.library.custom_op(f"{NAMESPACE}::rope_into", mutates_args=("kv",))
def rope_into(x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, layer: int, backend: str = "auto") -> None:
    """``tokentrim.ops.rope_into``: kv[layer, 0, :, :L] = RoPE(x), in place."""
    ops.rope_into(x, cos, sin, kv, layer, backend=backend)


@rope_into.register_fake
def _(x, cos, sin, kv, layer, backend="auto"):
    return None


@torch.library.custom_op(f"{NAMESPACE}::rms_norm", mutates_args=())
def rms_norm(x: Tensor, w: Tensor, eps: float, out_dtype: torch.dtype, backend: str = "auto") -> Tensor:
    """``tokentrim.ops.rms_norm``."""
    return _fresh(ops.rms_norm(x, w, eps, out_dtype, backend=backend), x)


@rms_norm.register_fake
def _(x, w, eps, out_dtype, backend="auto"):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


def _pair(t: Optional[Tensor], e: Optional[Tensor]):
    if (t is None) != (e is None):
        raise ValueError("a modulation vector needs both its table and its per-frame part (or neither)")
    return None if t is None else (t, e)


@torch.library.custom_op(f"{NAMESPACE}::residual_ln_modulate", mutates_args=())
def residual_ln_modulate(
    x: Tensor, y: Tensor, gate_t: Optional[Tensor], gate_e: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], shift_t: Optional[Tensor], shift_e: Optional[Tensor], scale_t: Optional[Tensor],
    scale_e: Optional[Tensor], eps: float, out_dtype: torch.dtype, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``tokentrim.ops.residual_ln_modulate`` with the (table, per-frame) pairs flattened: (x_new, out)."""
    xn, out = ops.residual_ln_modulate(x, y, _pair(gate_t, gate_e), weight, bias, _pair(shift_t, shift_e),
                                       _pair(scale_t, scale_e), eps, out_dtype, backend=backend)
    return _fresh(xn, x, y), _fresh(out, x, y)


@residual_ln_modulate.register_fake
def _(x, y, gate_t, gate_e, weight, bias, shift_t, shift_e, scale_t, scale_e, eps, out_dtype, backend="auto"):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty(x.shape, dtype=out_dtype, device=x.device)


@torch.library.custom_op(f"{NAMESPACE}::ln_modulate", mutates_args=())
def ln_modulate(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift_t: Optional[Tensor], shift_e: Optional[Tensor],
    scale_t: Optional[Tensor], scale_e: Optional[Tensor], eps: float, out_dtype: torch.dtype, backend: str = "auto",
) -> Tensor:
    """``tokentrim.ops.ln_modulate`` with the (table, per-frame) pairs flattened."""
    out = ops.ln_modulate(x, weight, bias, _pair(shift_t, shift_e), _pair(scale_t, scale_e), eps, out_dtype,
                          backend=backend)
    return _fresh(out, x)


@ln_modulate.register_fake
def _(x, weight, bias, shift_t, shift_e, scale_t, scale_e, eps, out_dtype, backend="auto"):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


# -------------------------------------------------------------------------------- RoPE re-base
@torch.library.custom_op(f"{NAMESPACE}::rope_rebase", mutates_args=("k",))
def rope_rebase(k: Tensor, delta: Tensor, theta: float = 10000.0, backend: str = "auto") -> None:
    """``tokentrim.ops.rope_rebase``: moves every key's temporal RoPE position by ``delta`` (0-dim
    int device tensor) in place. Host sync: none."""
    ops.rope_rebase(k, delta, theta, backend=backend)


@rope_rebase.register_fake
def _(k, delta, theta=10000.0, backend="auto"):
    return None


__all__ = [
    "NAMESPACE", "attention_tiles", "compact_kv", "drift_topk", "ln_modulate", "masked_attention", "qk_norm_rope",
    "residual_ln_modulate", "rms_norm", "rope_into", "rope_rebase", "plan_width",
]
