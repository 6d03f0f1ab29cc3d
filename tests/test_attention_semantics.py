"""What every masked_attention / compact_kv backend agrees on (issue 12): NaN in q/k/v propagates,
keys that are not attended never influence the output (even NaN/Inf ones), kv_len outside
[0, Lk] is refused where the check is free (CPU) and clamped in the kernels.

The reference is also checked against a naive float64 oracle written here, independent of SDPA.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokentrim import ops, reference
from tokentrim.kernels import masked_attention as kattn

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["reference", "triton"]
T = kattn.tile_size()


def oracle(q, k, v, mask, scale=None):
    """Naive float64 attention over the keys where mask [B,Lk] is True; rows without keys are 0.
    Non-attended keys are dropped (not multiplied by 0), so NaN there cannot reach the result."""
    B, Lq, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    for b in range(B):
        idx = mask[b].nonzero().flatten().cpu()
        if idx.numel() == 0:
            continue
        kb, vb = k[b].double().cpu()[idx], v[b].double().cpu()[idx]
        s = torch.einsum("qhd,khd->hqk", q[b].double().cpu(), kb) * scale
        out[b] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vb)
    return out


def inputs(B, Lq, H, D, L, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g).to(DEVICE)
    kv = torch.randn(2, B, L, H, D, generator=g).to(DEVICE)
    return q, kv[0], kv[1]


def attend(backend, q, k, v, **kw):
    return ops.masked_attention(q, k, v, backend=backend, **kw)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_q_propagates(backend):
    """The issue's example: one NaN in q used to give zeros on the reference."""
    q, k, v = inputs(1, 8, 2, 64, 2 * T + 3, seed=1)
    q[0, 0, 0, 0] = math.nan
    o = attend(backend, q, k, v)
    assert o[0, 0, 0].isnan().all()
    o[0, 0, 0] = 0
    assert not o.isnan().any(), "NaN must stay in its own query row and head"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_an_attended_key_propagates(backend):
    q, k, v = inputs(2, 5, 2, 64, 3 * T + 1, seed=2)
    keep = torch.ones(2, k.shape[1], dtype=torch.bool, device=DEVICE)
    k[0, 5, 1, 3] = math.nan  # video 0, head 1
    v[1, T + 2, 0, 7] = math.nan  # video 1, head 0, only channel 7 of the output
    o = attend(backend, q, k, v, keep=keep)
    assert o[0, :, 1].isnan().all() and not o[0, :, 0].isnan().any()
    assert o[1, :, 0, 7].isnan().all() and o[1].isnan().sum() == o.shape[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unattended_keys_never_influence(backend):
    """NaN/Inf in K and V at masked keys (inside partly kept tiles) and past kv_len (not
    tile-aligned) must not leak; the result equals the float64 oracle on the attended keys."""
    B, Lq, H, D, L = 2, 7, 2, 64, 5 * T + 3
    q, k, v = inputs(B, Lq, H, D, L, seed=3)
    g = torch.Generator().manual_seed(33)
    keep = (torch.rand(B, L, generator=g) < 0.6).to(DEVICE)
    kv_len = torch.tensor([4 * T + 5, L - 2], dtype=torch.int32, device=DEVICE)
    mask = reference.attention_mask(keep, kv_len, B, L, DEVICE)
    bad = ~mask
    k[bad] = math.nan
    v[bad] = math.inf
    v[0, 4 * T + 5 :] = -math.inf
    want = oracle(q, k, v, mask)
    got = attend(backend, q, k, v, keep=keep, kv_len=kv_len)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    # kv_len alone, stale slots past it full of NaN (an uninitialised cache)
    _, k2, v2 = inputs(B, Lq, H, D, L, seed=30)
    mask_len = reference.attention_mask(None, kv_len, B, L, DEVICE)
    k2[~mask_len] = math.nan
    v2[~mask_len] = math.nan
    got = attend(backend, q, k2, v2, kv_len=kv_len)
    torch.testing.assert_close(got.double().cpu(), oracle(q, k2, v2, mask_len), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_are_zero_even_next_to_nan(backend):
    q, k, v = inputs(2, 3, 1, 64, T + 1, seed=4)
    keep = torch.zeros(2, T + 1, dtype=torch.bool, device=DEVICE)
    keep[1, 2] = True
    k[0] = math.nan
    v[0] = math.nan
    o = attend(backend, q, k, v, keep=keep)
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    torch.testing.assert_close(o[1], v[1, 2:3].expand(3, 1, 64))


def test_reference_matches_float64_oracle_fp16_and_scale():
    q, k, v = inputs(2, 9, 3, 128, 37, seed=5)
    q, k, v = q.half(), k.half(), v.half()
    keep = torch.rand(2, 37, generator=torch.Generator().manual_seed(5)).to(DEVICE) < 0.5
    kv_len = torch.tensor([30, 37], dtype=torch.int32, device=DEVICE)
    got = reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len, scale=0.2)
    assert got.dtype == torch.float16
    mask = reference.attention_mask(keep, kv_len, 2, 37, DEVICE)
    torch.testing.assert_close(got.double().cpu(), oracle(q, k, v, mask, scale=0.2), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(HAS_CUDA, reason="the free (CPU) kv_len check; CUDA tensors check only on request")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 11])
def test_kv_len_out_of_range_rejected_on_cpu(backend, bad):
    q, k, v = inputs(2, 4, 1, 64, 10, seed=6)
    kv_len = torch.tensor([3, bad], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_len values must be in \[0, Lk_max=10\]"):
        attend(backend, q, k, v, kv_len=kv_len)
    kv = torch.zeros(3, 2, 10, 1, 64)
    keep = torch.ones(2, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"kv_len values must be in \[0, Lk_max=10\]"):
        ops.compact_kv(kv, keep, kv_len, backend=backend)
    with pytest.raises(ValueError, match="kv_len values"):
        reference.masked_attention(q, k, v, kv_len=kv_len)
    # bounds themselves are fine
    attend(backend, q, k, v, kv_len=torch.tensor([0, 10], dtype=torch.int32))


def test_compact_kernel_clamps_kv_len():
    """The kernel itself (no check) clamps kv_len to [0, L]: same as the reference at the clamp."""
    from tokentrim.kernels import kv_compact

    g = torch.Generator().manual_seed(7)
    kv = torch.randn(2, 2, 3, 2 * T + 3, 1, 64, generator=g).to(DEVICE)
    keep = (torch.rand(3, 2 * T + 3, generator=g) < 0.5).to(DEVICE)
    kv_len = torch.tensor([-5, 2 * T + 3 + 9, T], dtype=torch.int32, device=DEVICE)
    got, want = kv.clone(), kv.clone()
    n_got = kv_compact.compact_kv(got, keep, kv_len)
    n_want = reference.compact_kv(want, keep, kv_len.clamp(0, 2 * T + 3))
    assert torch.equal(n_got, n_want)
    for b in range(3):
        n = int(n_want[b])
        assert torch.equal(got[:, :, b, :n], want[:, :, b, :n])


@pytest.mark.gpu
def test_kv_len_check_opt_in_on_cuda():
    q, k, v = inputs(2, 4, 1, 64, 10, seed=8)
    kv_len = torch.tensor([3, 11], dtype=torch.int32, device="cuda")
    ops.masked_attention(q, k, v, kv_len=kv_len)  # no sync, clamped
    with pytest.raises(ValueError, match="kv_len values"):
        ops.masked_attention(q, k, v, kv_len=kv_len, check_range=True)


def test_reference_runs_through_sdpa_with_a_mask(monkeypatch):
    """The CPU reference is one SDPA call with a boolean mask (not a naive Lq x Lk fp32 softmax),
    and it never reads keys past the largest kv_len on CPU."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(k.shape), None if attn_mask is None else attn_mask.dtype))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = inputs(2, 3, 2, 64, 40, seed=9)
    kv_len = torch.tensor([12, 25], dtype=torch.int32, device=DEVICE)
    reference.masked_attention(q, k, v, keep=torch.ones(2, 40, dtype=torch.bool, device=DEVICE), kv_len=kv_len)
    assert len(calls) == 1 and calls[0][1] == torch.bool
    if DEVICE == "cpu":
        assert calls[0][0][2] == 25, "keys past max(kv_len) are not read on CPU"
