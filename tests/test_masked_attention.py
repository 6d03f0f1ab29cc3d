"""masked_attention: the Triton flash-attention kernel against tokentrim.reference (and FlexAttention).

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1): small shapes,
fp32/fp16 only (bf16 is broken in the interpreter; bf16 runs in the GPU-only tests). K/V are views
sliced out of a [layers, 2, B, L, H, D] cache tensor, as the model passes them.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokentrim import ops, reference
from tokentrim.kernels import masked_attention as kattn
from tokentrim.kernels.validate import check_kv_len_range

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
T = kattn.tile_size()


def cache_views(B, L, H, D, dtype, seed, layers=3, layer=1, device=DEVICE):
    """k, v as non-contiguous views of one [layers, 2, B, L, H, D] cache tensor."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(layers, 2, B, L, H, D, generator=g).to(device=device, dtype=dtype)
    return cache, cache[layer, 0], cache[layer, 1]


def make_q(B, Lq, H, D, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(B, Lq, H, D, generator=g).to(device=device, dtype=dtype)


def random_keep(B, L, frac, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 2000)
    return (torch.rand(B, L, generator=g) < frac).to(device)


def run_kernel(q, k, v, **kw):
    """Launch into a NaN pre-filled output and check that every element got written."""
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device)
    res = kattn.masked_attention(q, k, v, out=out, **kw)
    assert res is out
    assert not out.isnan().any(), "unwritten (NaN) output element"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,Lq,H,D,L",
    [
        (2, 19, 3, 64, 77),  # Lk not a multiple of the tile, odd H
        (1, 1, 2, 128, 5 * T + 3),  # single query row, D=128
        (3, 33, 1, 64, 4 * T),
    ],
)
def test_kernel_matches_reference(dtype, B, Lq, H, D, L):
    seed = B * 1000 + Lq * 10 + D + L
    _, k, v = cache_views(B, L, H, D, dtype, seed)
    q = make_q(B, Lq, H, D, dtype, seed)
    keep = random_keep(B, L, 0.6, seed)
    keep[:, T : 3 * T] = False  # whole pruned tiles
    kv_len = torch.tensor([L - 7, 0, L][:B], dtype=torch.int32, device=DEVICE)
    for kw in (dict(), dict(keep=keep), dict(kv_len=kv_len), dict(keep=keep, kv_len=kv_len)):
        got = run_kernel(q, k, v, **kw)
        want = reference.masked_attention(q, k, v, **kw)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, kw=kw: f"{sorted(kw)}: {m}")


def test_scale_strided_keep_and_ops_wrapper():
    B, Lq, H, D, L = 2, 9, 2, 64, 40
    _, k, v = cache_views(B, L, H, D, torch.float32, 7)
    q = make_q(B, Lq, H, D, torch.float32, 7)
    keep = random_keep(L, B, 0.5, 7).t()  # non-contiguous mask
    kv_len = torch.tensor([31, 40], dtype=torch.int32, device=DEVICE)
    got = ops.masked_attention(q, k, v, keep=keep, kv_len=kv_len, scale=0.3, backend="triton")
    want = reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len, scale=0.3)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    default = reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len)
    assert not torch.allclose(got, default, atol=1e-3), "scale must change the result"


def test_rows_without_keys_are_zero():
    B, Lq, H, D, L = 3, 5, 2, 64, 2 * T + 5
    _, k, v = cache_views(B, L, H, D, torch.float32, 11)
    q = make_q(B, Lq, H, D, torch.float32, 11)
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[0] = False  # video 0: everything pruned
    keep[2, 4:] = False  # video 2: keys 0..2 only (kv_len = 3)
    kv_len = torch.tensor([L, 0, 3], dtype=torch.int32, device=DEVICE)  # video 1: empty cache
    got = run_kernel(q, k, v, keep=keep, kv_len=kv_len)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert got[2].abs().sum() > 0
    torch.testing.assert_close(got, reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len))


def test_skipped_tiles_are_not_loaded():
    """NaN in the V of fully pruned tiles and past kv_len must not reach the output.

    A loaded-then-masked tile would give 0 * NaN = NaN through p @ v, so a finite result that
    matches the reference on clean data shows those tiles were skipped, not just masked.
    """
    B, Lq, H, D, L = 2, 7, 3, 64, 6 * T + 2
    cache, k, v = cache_views(B, L, H, D, torch.float32, 5)
    q = make_q(B, Lq, H, D, torch.float32, 5)
    keep = random_keep(B, L, 0.7, 5)
    keep[0, 2 * T : 4 * T] = False
    keep[1, 0:T] = False
    kv_len = torch.tensor([5 * T, L], dtype=torch.int32, device=DEVICE)
    want = reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len)
    v[0, 2 * T : 4 * T] = math.nan
    v[0, 5 * T :] = math.nan  # past kv_len, tile-aligned
    v[1, 0:T] = math.nan
    k[0, 5 * T :] = math.nan
    got = run_kernel(q, k, v, keep=keep, kv_len=kv_len)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_attention_plan_lists_full_and_partial_tiles():
    """The plan against a Python recount: full FULL_TILE-key tiles, partial PART_TILE-key tiles
    (attended, not all, not inside a full tile), packed keep bits, counts."""
    F, P = kattn.FULL_TILE, kattn.PART_TILE
    B, L = 3, 3 * F + P + 5
    keep = random_keep(B, L, 0.3, 3)
    keep[:, :F] = True  # a full tile
    keep[:, F : F + P] = True  # full half of a partial-only FULL tile
    keep[:, 2 * F : 3 * F] = False  # nothing attended
    keep[1] = False
    kv_len = torch.tensor([L, L, F + 3], dtype=torch.int32, device=DEVICE)
    tiles, counts = kattn.attention_plan(keep, kv_len)
    n_f, n_p, width = kattn.plan_sections(L)
    assert tiles.shape == (B, width) and width == kattn.plan_width(L)
    for b in range(B):
        att = [bool(keep[b, j]) and j < kv_len[b] for j in range(L)] + [False] * (n_p * P - L)
        full = [t for t in range(L // F) if all(att[t * F : (t + 1) * F])]
        part = [
            t for t in range(n_p)
            if any(att[t * P : (t + 1) * P]) and not all(att[t * P : (t + 1) * P]) or (
                all(att[t * P : (t + 1) * P]) and (t * P) // F not in full
            )
        ]  # fmt: skip
        assert counts[b].tolist() == [len(full), len(part)]
        assert tiles[b, : len(full)].tolist() == full
        assert tiles[b, n_f : n_f + len(part)].tolist() == part
        words = tiles[b, n_f + n_p :].clone().view(torch.int64)  # (low, high) pairs -> one 64-bit word
        for t in range(n_p):
            w = int(words[t]) & ((1 << 64) - 1)
            assert [bool(w >> j & 1) for j in range(P)] == att[t * P : (t + 1) * P]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_against_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    B, Lq, H, D, L = 2, 24, 3, 64, 50
    _, k, v = cache_views(B, L, H, D, torch.float32, 21)
    q = make_q(B, Lq, H, D, torch.float32, 21)
    keep = random_keep(B, L, 0.5, 21)
    keep[:, 0] = True
    kv_len = torch.tensor([37, 50], dtype=torch.int32, device=DEVICE)

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx] & (kv_idx < kv_len[b])

    block_mask = flex.create_block_mask(mask_mod, B, None, Lq, L, device=DEVICE)
    want = flex.flex_attention(
        q.transpose(1, 2),
        k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
        block_mask=block_mask,
    ).transpose(1, 2)
    got = run_kernel(q, k, v, keep=keep, kv_len=kv_len)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- bad input
def _qkv(D=64, device=DEVICE):
    return make_q(2, 4, 3, D, torch.float32, 0, device), *cache_views(
        2, 10, 3, D, torch.float32, 0, device=device
    )[1:]


def test_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k must be"):
        kattn.masked_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="v must have"):
        kattn.masked_attention(q, k, v[:, :9])
    with pytest.raises(ValueError, match="keep must be"):
        kattn.masked_attention(q, k, v, keep=torch.ones(2, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="kv_len must be"):
        kattn.masked_attention(q, k, v, kv_len=torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="q must have 4"):
        kattn.masked_attention(q[0], k, v)
    with pytest.raises(ValueError, match="out must be"):
        kattn.masked_attention(q, k, v, out=torch.empty(2, 4, 3, 32, device=DEVICE))


def test_bad_head_dim_and_strides():
    q, k, v = _qkv(D=32)
    with pytest.raises(ValueError, match="D must be one of"):
        kattn.masked_attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="contiguous last dimension"):
        kattn.masked_attention(q, torch.randn(2, 10, 3, 128, device=DEVICE)[..., ::2], v)


def test_bad_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        kattn.masked_attention(q, k.half(), v.half())
    with pytest.raises(TypeError, match="keep must have dtype"):
        kattn.masked_attention(q, k, v, keep=torch.ones(2, 10, device=DEVICE))
    with pytest.raises(TypeError, match="kv_len must have dtype"):
        kattn.masked_attention(q, k, v, kv_len=torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="q must have dtype"):
        kattn.masked_attention(q.to(torch.int32), k, v)


def test_mixed_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="device"):
        kattn.masked_attention(q, k.to("meta"), v.to("meta"))
    with pytest.raises(ValueError, match="device"):
        kattn.masked_attention(q, k, v, kv_len=torch.ones(2, dtype=torch.int32, device="meta"))


def test_kv_len_range_check():
    q, k, v = _qkv()
    too_long = torch.tensor([3, 11], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="kv_len values must be in"):
        check_kv_len_range(too_long, k.shape[1])
    with pytest.raises(ValueError, match="kv_len values must be in"):
        kattn.masked_attention(q, k, v, kv_len=too_long, check_range=True)
    # Without the (syncing) check, the kernel clamps kv_len to [0, Lk_max].
    got = run_kernel(q, k, v, kv_len=too_long)
    torch.testing.assert_close(got, reference.masked_attention(q, k, v, kv_len=too_long.clamp(max=10)))
    negative = torch.tensor([-4, 7], dtype=torch.int32, device=DEVICE)
    got = run_kernel(q, k, v, kv_len=negative)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got, reference.masked_attention(q, k, v, kv_len=negative.clamp(min=0)))


# -------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_bf16_gpu(D):
    B, Lq, H, L = 2, 300, 12, 1031
    _, k, v = cache_views(B, L, H, D, torch.bfloat16, 1)
    q = make_q(B, Lq, H, D, torch.bfloat16, 1)
    keep = random_keep(B, L, 0.5, 1)
    keep[:, 128:512] = False
    kv_len = torch.tensor([900, L], dtype=torch.int32, device=DEVICE)
    got = run_kernel(q, k, v, keep=keep, kv_len=kv_len)
    torch.testing.assert_close(
        got, reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len), **TOL[torch.bfloat16]
    )


@pytest.mark.gpu
def test_autotuned_large_gpu():
    """Lq buckets of the autotuner and a long cache (Wan-like shape, scaled down in heads)."""
    B, H, D, L = 1, 2, 128, 14040
    _, k, v = cache_views(B, L, H, D, torch.float16, 2, layers=2)
    keep = random_keep(B, L, 0.9, 2)
    kv_len = torch.tensor([L - 1000], dtype=torch.int32, device=DEVICE)
    for Lq in (1, 1560, 4680):
        q = make_q(B, Lq, H, D, torch.float16, Lq)
        got = run_kernel(q, k, v, keep=keep, kv_len=kv_len)
        want = reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len)
        torch.testing.assert_close(got, want, **TOL[torch.float16])


def test_precomputed_tiles_shared_across_layers():
    """One ops.attention_tiles plan serves several layers' calls and changes nothing."""
    B, Lq, H, D, L = 2, 7, 3, 64, 53
    keep = random_keep(B, L, 0.4, seed=11)
    keep[0, 16:32] = False  # a whole pruned tile
    kv_len = torch.tensor([45, 29], dtype=torch.int32, device=DEVICE)
    plan = ops.attention_tiles(keep, kv_len, backend="triton")
    assert ops.attention_tiles(keep, kv_len, backend="reference") is None
    for layer in range(2):
        _, k, v = cache_views(B, L, H, D, torch.float32, seed=3, layer=layer)
        q = make_q(B, Lq, H, D, torch.float32, seed=layer + 5)
        want = reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len)
        got = ops.masked_attention(q, k, v, keep=keep, kv_len=kv_len, backend="triton", tiles=plan)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tiles"):
        kattn.masked_attention(q, k, v, keep=keep, kv_len=kv_len, tiles=(plan[0][:, :2], plan[1]))
