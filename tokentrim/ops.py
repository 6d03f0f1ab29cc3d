"""Public functional ops of tokentrim, each with a pure-PyTorch twin in ``tokentrim.reference``.

Dispatch (``backend=``):

- ``"auto"``: the Triton kernel for CUDA tensors; on CPU the native C++ kernel where the extension
  ``tokentrim._C`` is built and has one (``drift_topk``, ``compact_kv``), else the reference.
- ``"triton"``: the Triton kernel; on CPU tensors only under ``TRITON_INTERPRET=1`` (set before
  tokentrim is imported).
- ``"reference"``: the pure-PyTorch definition, on any device.
- ``"native"``: the C++ CPU kernel of ``tokentrim._C`` (``drift_topk`` and ``compact_kv`` only, CPU
  tensors only; see ``tokentrim.native``).
- ``"flash-attn"``: ``masked_attention`` only, through ``flash_attn_with_kvcache`` (``tokentrim.flash``)
  on CUDA tensors when the optional flash_attn package is importable; dense or compacted caches
  (keep=None) with device-side kv_len.

A backend that cannot serve the request raises ``RuntimeError`` saying why.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from tokentrim import flash, native, reference
from tokentrim.kernels.validate import (
    check_attention_inputs,
    check_compact_inputs,
    check_drift_inputs,
    check_finite,
    check_kv_len_range_if_free,
)

BACKENDS = ("auto", "triton", "reference", "native", "flash-attn")
NATIVE_OPS = ("drift_topk", "compact_kv")  # ops with a native CPU kernel in tokentrim._C


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Return "triton", "native" or "reference" for op ``op`` on a tensor on ``device``, or raise
    if unservable. "auto" picks "native" only for an ``op`` in ``NATIVE_OPS`` on CPU when built."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "flash-attn":
        if op != "masked_attention":
            raise ValueError("backend='flash-attn' serves masked_attention only; use 'auto', 'triton' or 'reference'")
        if not flash.available():
            raise RuntimeError(
                "backend='flash-attn' needs the optional flash_attn package (pip install flash-attn), "
                "which is not importable here"
            )
        if device.type != "cuda":
            raise RuntimeError(f"backend='flash-attn' runs on CUDA tensors only, got {device.type} tensors")
        return "flash-attn"
    if backend == "native":
        if op not in NATIVE_OPS:
            raise RuntimeError(f"backend='native' has no {op} kernel (native ops: {', '.join(NATIVE_OPS)})")
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors, got {device.type} tensors")
        native.require()
        return "native"
    can_triton = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()))
    if backend == "auto":
        if can_triton and device.type == "cuda":
            return "triton"
        if device.type == "cpu" and op in NATIVE_OPS and native.available():
            return "native"
        return "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not installed")
    if not can_triton:
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing tokentrim to run the kernels on CPU"
        )
    return "triton"


def _kernel(name: str):
    return importlib.import_module(f"tokentrim.kernels.{name}")


def drift_topk(cand, prev, k: int, patch=(2, 2), backend: str = "auto", check_finite_inputs: bool = True):
    """Per-token drift between two latent blocks, its top-k and the drift severity.

    Args:
        cand: candidate block latents [B,F,C,H,W], bf16/fp16/fp32.
        prev: previously accepted block latents [B,F',C,H,W] (same B, C, H, W; F' may differ).
        k: size of the unstable set, 1 <= k <= N with N = (H/ph)*(W/pw).
        patch: (ph, pw) token patch, the model's spatial patch size.
        check_finite_inputs: raise ``ValueError`` on NaN/Inf latents (one host sync).

    Returns:
        drift [B,N] fp32 (L2 distance of the frame-mean token summaries), topk_idx [B,k] int64
        (most drifted first, ties toward the lower index), severity [B] fp32 (mean drift of the
        top-k set).
    """
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else patch
    check_drift_inputs(cand, prev, k, patch)
    if check_finite_inputs:
        check_finite("cand", cand)
        check_finite("prev", prev)
    impl = resolve_backend(backend, cand.device, "drift_topk")
    if impl == "triton":
        return _kernel("drift").drift_topk(cand, prev, k, patch)
    if impl == "native":
        return native.drift_topk(cand, prev, k, patch)
    return reference.drift_topk(cand, prev, k, patch)


def attention_tiles(keep, kv_len=None, backend: str = "auto"):
    """Precompute which key tiles ``masked_attention`` must visit, for reuse across layers.

    keep [B,Lk] bool, kv_len [B] int32 or None. Returns an opaque plan (a tuple of int tensors, see
    ``tokentrim.kernels.masked_attention.AttentionPlan``: full tiles, partial tiles, packed keep
    bits, counts) to pass as ``tiles=`` to every ``masked_attention`` call under the same
    keep/kv_len (e.g. all layers of one forward), or None where the backend has no use for it
    (reference). Host sync: none.
    """
    if keep is None or backend == "flash-attn":
        return None
    if resolve_backend(backend, keep.device, "attention_tiles") != "triton":
        return None
    return _kernel("masked_attention").attention_plan(keep, kv_len)


def masked_attention(
    q, k, v, keep=None, kv_len=None, scale=None, backend: str = "auto", tiles=None, check_range: bool = False
):
    """Attention of q over the kept keys of a (cache-layout) K/V buffer.

    Args:
        q: [B,Lq,H,D] queries, bf16/fp16/fp32 (fp32 mainly for the interpreter).
        k, v: [B,Lk_max,H,D] keys/values, read in place with their strides (e.g. a cache view).
        keep: optional [B,Lk_max] bool, True = attend.
        kv_len: optional [B] int32 device tensor; keys at or past kv_len[b] are ignored.
        scale: softmax scale, default D**-0.5.
        tiles: optional plan from ``attention_tiles(keep, kv_len)`` (Triton only; ignored otherwise).
        check_range: also check 0 <= kv_len <= Lk_max on CUDA (one host sync). A CPU kv_len is
            always checked (free); the kernels clamp it to [0, Lk_max] in any case.

    Returns:
        o [B,Lq,H,D] in q's dtype; a query row with no kept key is all zeros. Keys not attended
        never influence the output (even NaN/Inf ones); NaN in q or attended K/V propagates.
    """
    check_attention_inputs(q, k, v, keep, kv_len)
    check_kv_len_range_if_free(kv_len, k.shape[1], force=check_range)
    resolved = resolve_backend(backend, q.device, "masked_attention")
    if resolved == "flash-attn":
        return flash.masked_attention(q, k, v, keep=keep, kv_len=kv_len, scale=scale)
    # checked above: the backends skip their own copy of check_attention_inputs (one call per layer)
    if resolved == "triton":
        return _kernel("masked_attention").masked_attention_unchecked(
            q, k, v, keep=keep, kv_len=kv_len, scale=scale, tiles=tiles
        )
    return reference.masked_attention_unchecked(q, k, v, keep=keep, kv_len=kv_len, scale=scale)


def compact_kv(kv, keep, kv_len, backend: str = "auto", check_range: bool = False):
    """Move the kept tokens of every layer's K and V to the front (stable), in place.

    Args:
        kv: [..., B, L, H, D] cache tensor (e.g. [layers, 2, B, L, H, D]).
        keep: [B, L] bool, True = keep.
        kv_len: [B] int32, tokens in use per video, in [0, L]: a CPU kv_len is checked (free),
            a CUDA one only with ``check_range`` (one host sync); the kernel clamps it.

    Returns:
        new kv_len [B] int32 (number of kept tokens below the old kv_len). Slots past it are
        unspecified.
    """
    check_compact_inputs(kv, keep, kv_len)
    check_kv_len_range_if_free(kv_len, kv.shape[-3], force=check_range)
    impl = resolve_backend(backend, kv.device, "compact_kv")
    if impl == "triton":
        return _kernel("kv_compact").compact_kv(kv, keep, kv_len)
    if impl == "native":
        return native.compact_kv(kv, keep, kv_len)
    return reference.compact_kv(kv, keep, kv_len)


def rope_rebase(k, delta, theta: float = 10000.0, backend: str = "auto"):
    """Move the temporal RoPE position of every key in ``k`` by ``delta`` frames, in place.

    Args:
        k: [..., D] keys stored after Wan2.1's 3D RoPE, e.g. a KV cache's keys of every layer
            ``cache.kv[:, 0]`` [layers, B, L, H, D]; fp32/fp16/bf16.
        delta: 0-dim int32/int64 tensor on k's device (graph-safe: read on the device), or an int.
        theta: the RoPE base (Wan: 10000).

    Returns:
        k. Attention of queries at positions p + delta over the re-based keys equals attention of
        queries at p over the original keys (up to one rounding of k to its dtype). Host sync: none.
    """
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    if isinstance(delta, bool) or not isinstance(delta, (int, torch.Tensor)):
        raise TypeError(f"delta must be an int or a 0-dim integer tensor, got {type(delta).__name__}")
    if isinstance(delta, int):
        delta = torch.tensor(delta, dtype=torch.int64, device=k.device)
    if resolve_backend(backend, k.device, "rope_rebase") == "triton":
        return _kernel("rope_rebase").rope_rebase_(k, delta, theta)
    return reference.rope_rebase(k, delta, theta)


# Registers torch.ops.tokentrim.* (at the end: custom_ops calls back into this module).
from tokentrim import custom_ops as _custom_ops  # noqa: E402, F401


# ------------------------------------------------------------------------------- fused model ops
# (kept after the registration import above: custom_ops looks these up at call time only)
def qk_norm_rope(q, k, v, wq, wk, cos, sin, eps: float, kv, layer: int, start, k_raw=None, n_raw: int = 0,
                 backend: str = "auto"):
    """q/k RMSNorm across heads + 3D RoPE + cast, K and V written into the cache slot.

    Args:
        q, k, v: [B, T, dim] projections (dim = H*D), last dim contiguous.
        wq, wk: [dim] RMSNorm weights. cos, sin: [T, D/2] fp32 RoPE tables of the block's tokens.
        kv: the cache buffer [layers, 2, B, C, H, D]; k_rot/v go to kv[layer, 0/1, b, start[b] + t].
        start: [B] int32/int64 device tensor (the cache length). k_raw: optional [B, >= n_raw, H, D]
            that receives the normed un-rotated keys of the first n_raw tokens (raw sink).

    Returns:
        q_rot [B, T, H, D] in kv's dtype. Host sync: none.
    """
    if resolve_backend(backend, q.device, "qk_norm_rope") == "triton":
        return _kernel("qk_norm_rope").qk_norm_rope(q, k, v, wq, wk, cos, sin, eps, kv, layer, start, k_raw, n_raw)
    return reference.qk_norm_rope(q, k, v, wq, wk, cos, sin, eps, kv, layer, start, k_raw, n_raw)


def rope_into(x, cos, sin, kv, layer: int, backend: str = "auto") -> None:
    """RoPE of x [B, L, H, D] by cos/sin [L, D/2] fp32 written into kv[layer, 0, :, :L] (the raw
    Rolling Forcing sink re-rotated in front of the cache). In place; host sync: none."""
    if resolve_backend(backend, x.device, "rope_into") == "triton":
        return _kernel("qk_norm_rope").rope_into(x, cos, sin, kv, layer)
    return reference.rope_into(x, cos, sin, kv, layer)


def rms_norm(x, w, eps: float, out_dtype: torch.dtype, backend: str = "auto"):
    """RMSNorm of x [..., dim] over the last dim (fp32) times w [dim], cast once to out_dtype."""
    if resolve_backend(backend, x.device, "rms_norm") == "triton":
        return _kernel("qk_norm_rope").rms_norm(x, w, eps, out_dtype)
    return reference.rms_norm(x, w, eps, out_dtype)


def residual_ln_modulate(x, y, gate, weight, bias, shift, scale, eps: float, out_dtype: torch.dtype,
                         backend: str = "auto"):
    """x_new = x + gate*y; out = (LayerNorm(x_new) [affine] * (1 + scale) + shift) cast to out_dtype.

    x [B, F, S, dim] fp32 (the residual stream); y [B, F, S, dim]; gate, shift, scale: None or
    (table [dim], per-frame [B, F, dim]) pairs, the vector being table + per-frame; weight/bias:
    None or [dim]. y=None: plain LN + modulate (x_new is None). Returns (x_new fp32, out).
    Host sync: none.
    """
    if resolve_backend(backend, x.device, "residual_ln_modulate") == "triton":
        return _kernel("ln_modulate").residual_ln_modulate(x, y, gate, weight, bias, shift, scale, eps, out_dtype)
    return reference.residual_ln_modulate(x, y, gate, weight, bias, shift, scale, eps, out_dtype)


def ln_modulate(x, weight, bias, shift, scale, eps: float, out_dtype: torch.dtype, backend: str = "auto"):
    """``residual_ln_modulate`` without the residual: returns out only."""
    return residual_ln_modulate(x, None, None, weight, bias, shift, scale, eps, out_dtype, backend)[1]
