"""Pure-PyTorch definition of every tokentrim op: the specification kernels are tested against.

Shapes use B = videos, F = latent frames, C = latent channels, H/W = latent height/width,
N = tokens per frame = (H/ph)*(W/pw) in row-major (h, then w) order, the model's token order.
Everything is computed in float32 regardless of the input dtype.
"""

from __future__ import annotations

import torch

from tokentrim.kernels.validate import (
    FLOAT_DTYPES,
    check_attention_inputs,
    check_compact_inputs,
    check_drift_inputs,
    check_kv_len_range,
)
from tokentrim.kernels.validate_fused import (
    check_ln_inputs,
    check_qk_norm_rope_inputs,
    check_rms_norm_inputs,
    check_rope_into_inputs,
)


# --------------------------------------------------------------------------------------------- drift
def patchify(x: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """[B,F,C,H,W] -> [B,F,N,C*ph*pw] float32 token vectors (vector order c, i, j)."""
    B, F, C, H, W = x.shape
    ph, pw = patch
    t = x.float().reshape(B, F, C, H // ph, ph, W // pw, pw)
    t = t.permute(0, 1, 3, 5, 2, 4, 6)  # B, F, h, w, C, ph, pw
    return t.reshape(B, F, (H // ph) * (W // pw), C * ph * pw)


def latent_summary(x: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """Z = mean over frames of the patchified tokens: [B,F,C,H,W] -> [B,N,C*ph*pw] float32."""
    return patchify(x, patch).mean(dim=1)


def token_drift(cand: torch.Tensor, prev: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """d_i = ||Z_t(i) - Z_{t-1}(i)||_2: [B,N] float32."""
    return torch.linalg.vector_norm(latent_summary(cand, patch) - latent_summary(prev, patch), dim=-1)


def topk_lower_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B,k] int64 of the k largest values per row, largest first; ties go to the lower index."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def drift_topk(cand: torch.Tensor, prev: torch.Tensor, k: int, patch: tuple[int, int] = (2, 2)):
    """Reference of ``tokentrim.ops.drift_topk``.

    Returns (drift [B,N] fp32, topk_idx [B,k] int64 sorted by decreasing drift, severity [B] fp32 =
    mean drift over the top-k set).
    """
    check_drift_inputs(cand, prev, k, tuple(patch))
    drift = token_drift(cand, prev, tuple(patch))
    idx = topk_lower_index(drift, k)
    severity = drift.gather(1, idx).mean(dim=1)
    return drift, idx, severity


# ----------------------------------------------------------------------------------------- attention
def attention_mask(keep: torch.Tensor | None, kv_len: torch.Tensor | None, B: int, Lk: int, device) -> torch.Tensor:
    """Boolean [B,Lk] mask of attended keys: keep AND position < kv_len."""
    mask = torch.ones(B, Lk, dtype=torch.bool, device=device)
    if keep is not None:
        mask &= keep
    if kv_len is not None:
        mask &= torch.arange(Lk, device=device)[None, :] < kv_len.to(device)[:, None]
    return mask


def masked_attention(q, k, v, keep=None, kv_len=None, scale=None):
    """Reference of ``tokentrim.ops.masked_attention``: softmax attention in fp32 over the attended keys.

    q [B,Lq,H,D], k/v [B,Lk,H,D], keep [B,Lk] bool (True = attend), kv_len [B] int (keys at or past
    kv_len are ignored; on CPU a value outside [0, Lk] raises ``ValueError``, elsewhere it is clamped).
    Returns o [B,Lq,H,D] in q's dtype.

    Semantics every backend shares: a query row with no attended key is 0; a key that is not
    attended (keep False or at/past kv_len) never influences the output, even when its K or V hold
    NaN/Inf (it is zeroed before any arithmetic); NaN in q or in an attended key's K/V propagates
    to the output (nothing is ``nan_to_num``-ed).

    Computed with torch SDPA and a boolean key mask on fp32 copies (the CPU flash kernel: fast
    enough for CPU rollouts). On CPU the keys past the largest kv_len are not even read, so the
    cost follows the cache length (one host read of a CPU tensor, no device sync).
    """
    check_attention_inputs(q, k, v, keep, kv_len)
    if kv_len is not None and kv_len.device.type == "cpu":
        check_kv_len_range(kv_len, k.shape[1])
    return masked_attention_unchecked(q, k, v, keep, kv_len, scale)


def masked_attention_unchecked(q, k, v, keep=None, kv_len=None, scale=None):
    """``masked_attention`` for a caller that ran its checks already (``tokentrim.ops``: the input
    checks and the CPU kv_len range, once per layer call)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    mask = attention_mask(keep, kv_len, B, Lk, q.device)  # [B, Lk]
    if q.device.type == "cpu" and Lk > 0:
        used = mask.any(dim=0).nonzero()
        hi = int(used[-1, 0]) + 1 if used.numel() else 0
        k, v, mask = k[:, :hi], v[:, :hi], mask[:, :hi]
    if Lq == 0 or k.shape[1] == 0:
        return torch.zeros(B, Lq, H, D, dtype=q.dtype, device=q.device)
    dropped = ~mask[:, :, None, None]
    # one fp32 copy each (copy=True: an fp32 cache is never changed), unattended keys zeroed
    kf = k.to(torch.float32, copy=True).masked_fill_(dropped, 0).transpose(1, 2)
    vf = v.to(torch.float32, copy=True).masked_fill_(dropped, 0).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), kf, vf, attn_mask=mask[:, None, None, :], scale=scale
    ).transpose(1, 2)
    # rows with no attended key are 0 (SDPA may give NaN for an all-masked row)
    o.masked_fill_(~mask.any(dim=1)[:, None, None, None], 0)
    return o.to(q.dtype)


def compact_kv(kv: torch.Tensor, keep: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
    """Reference of ``tokentrim.ops.compact_kv``: in place, stable.

    kv [..., B, L, H, D] (any leading dims, e.g. layers and k/v), keep [B, L] bool, kv_len [B] int
    (on CPU a value outside [0, L] raises ``ValueError``; elsewhere it is clamped to [0, L]).
    For each video b the tokens j < kv_len[b] with keep[b, j] move to the front, in order.
    Returns the new lengths [B] int32. Slots at or past the new length hold unspecified values.
    """
    check_compact_inputs(kv, keep, kv_len)
    B, L = keep.shape
    if kv_len.device.type == "cpu":
        check_kv_len_range(kv_len, L)
    valid = keep & (torch.arange(L, device=keep.device)[None, :] < kv_len.to(keep.device)[:, None])
    new_len = valid.sum(dim=1).to(torch.int32)
    for b in range(B):
        idx = torch.nonzero(valid[b], as_tuple=False).flatten()
        n = idx.numel()
        kv[..., b, :n, :, :] = kv[..., b, :, :, :].index_select(-3, idx)
    return new_len


# ------------------------------------------------------------------------------- fused model ops
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w.float()


def _rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H*D] fp32 by cos/sin [T, D/2]: [B, T, H, D] fp32."""
    B, T, _ = x.shape
    p = x.reshape(B, T, H, -1, 2)
    x0, x1 = p[..., 0], p[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def qk_norm_rope(q, k, v, wq, wk, cos, sin, eps: float, kv, layer: int, start, k_raw=None, n_raw: int = 0):
    """Reference of ``tokentrim.ops.qk_norm_rope``: RMSNorm across heads (fp32) then interleaved
    RoPE, one rounding to kv's dtype. Writes k_rot / v into kv[layer, 0/1, b, start[b] + t] and the
    normed un-rotated keys of tokens t < n_raw into k_raw. Returns q_rot [B, T, H, D] (kv dtype)."""

    B, T, dim, H, D = check_qk_norm_rope_inputs(q, k, v, wq, wk, cos, sin, kv, layer, start, k_raw, n_raw)
    qn, kn = _rms(q, wq, eps), _rms(k, wk, eps)
    idx = start.long()[:, None] + torch.arange(T, device=q.device)
    bidx = torch.arange(B, device=q.device)[:, None]
    kv[layer, 0].index_put_((bidx, idx), _rope_pairs(kn, cos, sin, H).to(kv.dtype))
    kv[layer, 1].index_put_((bidx, idx), v.reshape(B, T, H, D).to(kv.dtype))
    if k_raw is not None and n_raw > 0:
        k_raw[:, :n_raw].copy_(kn.reshape(B, T, H, D)[:, :n_raw])
    return _rope_pairs(qn, cos, sin, H).to(kv.dtype)


def rope_into(x, cos, sin, kv, layer: int) -> None:
    """Reference of ``tokentrim.ops.rope_into``: kv[layer, 0, :, :L] = RoPE(x) (fp32, one rounding)."""

    B, L, H, D = check_rope_into_inputs(x, cos, sin, kv, layer)
    kv[layer, 0, :, :L].copy_(_rope_pairs(x.float().reshape(B, L, H * D), cos, sin, H))


def rms_norm(x, w, eps: float, out_dtype: torch.dtype):
    """Reference of ``tokentrim.ops.rms_norm``: RMSNorm over the last dim in fp32 times w, one rounding."""

    check_rms_norm_inputs(x, w, out_dtype)
    return _rms(x, w, eps).to(out_dtype)


def residual_ln_modulate(x, y, gate, weight, bias, shift, scale, eps: float, out_dtype: torch.dtype):
    """Reference of ``tokentrim.ops.residual_ln_modulate`` (fp32 throughout, one rounding of out).

    x_new = x + gate * y (x + y without gate); out = (LN(x_new)[*weight + bias] * (1 + scale) +
    shift).to(out_dtype). gate/shift/scale are (table [dim], per-frame [B, F, dim]) pairs or None.
    Returns (x_new, out); x_new is None when y is None (plain LN + modulate).
    """

    check_ln_inputs(x, y, gate, weight, bias, shift, scale, out_dtype)

    def vec(p):
        return (p[0].float() + p[1].float())[:, :, None, :]

    xn = x
    if y is not None:
        xn = x + (y.float() * vec(gate) if gate is not None else y.float())
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    n = torch.nn.functional.layer_norm(xn, (x.shape[-1],), w, b, eps)
    if shift is not None:
        n = n * (1 + vec(scale)) + vec(shift)
    return (xn if y is not None else None), n.to(out_dtype)


def ln_modulate(x, weight, bias, shift, scale, eps: float, out_dtype: torch.dtype):
    """Reference of ``tokentrim.ops.ln_modulate``: ``residual_ln_modulate`` without a residual."""
    return residual_ln_modulate(x, None, None, weight, bias, shift, scale, eps, out_dtype)[1]


# ------------------------------------------------------------------------------------ rope re-base
def rope_rebase(k: torch.Tensor, delta, theta: float = 10000.0) -> torch.Tensor:
    """Reference of ``tokentrim.ops.rope_rebase``: in place, returns k.

    k [..., D] keys after Wan2.1's 3D RoPE (interleaved pairs; the first D - 4*(D//6) channels are
    the temporal band). Every key's temporal position moves by ``delta`` (int or 0-dim integer
    tensor) frames: pair i of the temporal band turns by delta * theta**(-2i/band) (angles in
    float64, cos/sin in fp32, rotation in fp32); the spatial bands are untouched.
    """
    if isinstance(delta, torch.Tensor) and (delta.dim() != 0 or delta.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"delta must be a 0-dim int32/int64 tensor, got {delta.dtype} {tuple(delta.shape)}")
    if k.dtype not in FLOAT_DTYPES or k.dim() < 2 or k.shape[-1] < 6 or k.shape[-1] % 2:
        raise ValueError(f"k must be a float tensor [..., D] with even D >= 6, got {k.dtype} {tuple(k.shape)}")
    # deferred: tokentrim.model's package __init__ imports wan -> ops -> this module (a cycle at import)
    from tokentrim.model.rope import rope_split

    D = k.shape[-1]
    band = rope_split(D)[0]
    d = delta.to(device=k.device, dtype=torch.float64) if isinstance(delta, torch.Tensor) else torch.tensor(
        float(delta), dtype=torch.float64, device=k.device)
    ang = d * theta ** (-torch.arange(0, band, 2, dtype=torch.float64, device=k.device) / band)
    c, s = ang.cos().float(), ang.sin().float()
    x = k[..., :band].float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    k[..., :band] = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(k.dtype)
    return k
