"""Pure-PyTorch definition of every tokentrim op: the specification kernels are tested against.

Shapes use B = videos, F = latent frames, C = latent channels, H/W = latent height/width,
N = tokens per frame = (H/ph)*(W/pw) in row-major (h, then w) order, the model's token order.
Everything is computed in float32 regardless of the input dtype.
"""

from __future__ import annotations

import torch

from tokentrim.kernels.validate import (
    check_attention_inputs,
    check_compact_inputs,
    check_drift_inputs,
    check_kv_len_range,
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
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if kv_len is not None and kv_len.device.type == "cpu":
        check_kv_len_range(kv_len, Lk)
    scale = D**-0.5 if scale is None else float(scale)
    mask = attention_mask(keep, kv_len, B, Lk, q.device)  # [B, Lk]
    if q.device.type == "cpu" and Lk > 0:
        used = mask.any(dim=0).nonzero()
        hi = int(used[-1, 0]) + 1 if used.numel() else 0
        k, v, mask = k[:, :hi], v[:, :hi], mask[:, :hi]
    m4 = mask[:, :, None, None]
    zero = torch.zeros((), dtype=torch.float32, device=q.device)
    kf = torch.where(m4, k.float(), zero).transpose(1, 2)
    vf = torch.where(m4, v.float(), zero).transpose(1, 2)
    if Lq == 0 or kf.shape[2] == 0:
        return torch.zeros(B, Lq, H, D, dtype=q.dtype, device=q.device)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), kf, vf, attn_mask=mask[:, None, None, :], scale=scale
    ).transpose(1, 2)
    # rows with no attended key are 0 (SDPA may give NaN for an all-masked row)
    o = torch.where(mask.any(dim=1)[:, None, None, None], o, zero)
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
