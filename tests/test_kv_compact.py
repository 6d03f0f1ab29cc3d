"""compact_kv: the one-launch Triton compaction kernel against tokentrim.reference.compact_kv, and
compaction followed by attention against masked attention (masking == deleting a cached key).

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1): small shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import ops, reference
from tokentrim.kernels import kv_compact as kcompact
from tokentrim.kernels import masked_attention as kattn

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_cache(shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def make_keep(B, L, frac, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(B, L, generator=g) < frac).to(device)


def check_compaction(kv, keep, kv_len):
    """Kernel vs reference: same new lengths, identical first new_len tokens of every slice."""
    got_kv, want_kv = kv.clone(), kv.clone()
    got_len = kcompact.compact_kv(got_kv, keep, kv_len)
    # the kernel clamps kv_len to [0, L]; the reference refuses it on CPU (issue 12)
    want_len = reference.compact_kv(want_kv, keep, kv_len.clamp(0, kv.shape[-3]))
    assert got_len.dtype == torch.int32 and got_len.device == kv.device
    assert torch.equal(got_len, want_len)
    for b, n in enumerate(got_len.tolist()):
        assert torch.equal(got_kv[..., b, :n, :, :], want_kv[..., b, :n, :, :]), f"video {b} differs"
    return got_kv, got_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(dtype):
    B, L, H, D = 3, 53, 3, 24
    kv = make_cache((2, 2, B, L, H, D), dtype, 0)
    keep = make_keep(B, L, 0.6, 0)
    keep[:, 16:40] = False  # whole pruned tiles
    kv_len = torch.tensor([45, 0, L], dtype=torch.int32, device=DEVICE)
    check_compaction(kv, keep, kv_len)


def test_edge_cases_4d_and_long_lengths():
    """No leading dims; kv_len past L (clamped) and int64; nothing pruned; everything pruned."""
    B, L, H, D = 3, 37, 2, 16
    kv = make_cache((B, L, H, D), torch.float32, 1)
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[1] = False
    keep[2, ::3] = False
    kv_len = torch.tensor([L, L, L + 5], dtype=torch.int64, device=DEVICE)
    got, n = check_compaction(kv, keep, kv_len)
    assert n.tolist() == [L, 0, L - len(range(0, L, 3))]
    assert torch.equal(got[0], kv[0]), "a video with nothing pruned must be untouched"


def test_non_contiguous_leading_dims():
    """A strided slice of the cache (every other layer, transposed leading dims) is compacted in place."""
    B, L, H, D = 2, 29, 2, 16
    full = make_cache((4, 2, B, L, H, D), torch.float32, 2)
    keep = make_keep(B, L, 0.5, 2)
    kv_len = torch.tensor([29, 20], dtype=torch.int32, device=DEVICE)
    sub = full.transpose(0, 1)[:, ::2]  # leading [2, 2], neither contiguous nor mergeable
    want = sub.clone()
    want_len = reference.compact_kv(want, keep, kv_len)
    got_len = kcompact.compact_kv(sub, keep, kv_len)
    assert torch.equal(got_len, want_len)
    for b, n in enumerate(got_len.tolist()):
        assert torch.equal(full.transpose(0, 1)[:, ::2, b, :n], want[:, :, b, :n])
    assert torch.equal(full[1::2], make_cache((4, 2, B, L, H, D), torch.float32, 2)[1::2]), (
        "other layers touched"
    )


@pytest.mark.parametrize("D", [64, 128])
def test_compact_then_attention_equals_masked_attention(D):
    layers, B, L, H, Lq = 2, 2, 70, 3, 11
    cache = make_cache((layers, 2, B, L, H, D), torch.float32, D)
    q = make_cache((B, Lq, H, D), torch.float32, D + 1)
    keep = make_keep(B, L, 0.5, D)
    kv_len = torch.tensor([63, L], dtype=torch.int32, device=DEVICE)
    want = [
        kattn.masked_attention(q, cache[i, 0], cache[i, 1], keep=keep, kv_len=kv_len) for i in range(layers)
    ]
    new_len = ops.compact_kv(cache, keep, kv_len, backend="triton")
    for i in range(layers):
        got = kattn.masked_attention(q, cache[i, 0], cache[i, 1], kv_len=new_len)
        torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 40),
    H=st.integers(1, 3),
    frac=st.floats(0.0, 1.0),
    lens=st.lists(st.integers(0, 45), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(B, L, H, frac, lens, seed):
    kv = make_cache((2, B, L, H, 8), torch.float32, seed)
    keep = make_keep(B, L, frac, seed)
    kv_len = torch.tensor(lens[:B], dtype=torch.int32, device=DEVICE)
    got, n = check_compaction(kv, keep, kv_len)
    # The kept tokens, in order, are exactly the compacted prefix.
    for b in range(B):
        idx = [j for j in range(min(lens[b], L)) if keep[b, j]]
        assert torch.equal(got[:, b, : n[b]], kv[:, b, idx])


# ------------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    B, L, H, D = 2, 10, 2, 8
    kv = make_cache((2, B, L, H, D), torch.float32, 3)
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    kv_len = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="keep must be"):
        kcompact.compact_kv(kv, keep[:, :9], kv_len)
    with pytest.raises(ValueError, match="kv_len must be"):
        kcompact.compact_kv(kv, keep, kv_len[:1])
    with pytest.raises(ValueError, match="at least 4 dims"):
        kcompact.compact_kv(kv[0, 0], keep, kv_len)
    with pytest.raises(TypeError, match="keep must have dtype"):
        kcompact.compact_kv(kv, keep.int(), kv_len)
    with pytest.raises(TypeError, match="kv_len must have dtype"):
        kcompact.compact_kv(kv, keep, kv_len.float())
    with pytest.raises(TypeError, match="kv must have dtype"):
        kcompact.compact_kv(kv.to(torch.int32), keep, kv_len)
    with pytest.raises(ValueError, match="device"):
        kcompact.compact_kv(kv, keep.to("meta"), kv_len)
    with pytest.raises(ValueError, match="contiguous last"):
        kcompact.compact_kv(make_cache((B, L, H, 2 * D), torch.float32, 3)[..., ::2], keep, kv_len)


# -------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_cache_gpu(dtype):
    """Many layers and a long cache: exercises the sequential tile walk and the in-tile barrier."""
    B, L, H, D = 2, 4099, 12, 128
    kv = make_cache((6, 2, B, L, H, D), dtype, 4)
    keep = make_keep(B, L, 0.5, 4)
    keep[:, 100:900] = False
    kv_len = torch.tensor([4000, L], dtype=torch.int32, device=DEVICE)
    check_compaction(kv, keep, kv_len)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ops_compact_kv_rejects_bad_input_on_every_backend(backend):
    kv = torch.zeros(2, 2, 3, 8, 2, 64)
    keep = torch.ones(3, 8, dtype=torch.bool)
    kv_len = torch.full((3,), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="keep"):
        ops.compact_kv(kv, keep[:, :5], kv_len, backend=backend)
    with pytest.raises(TypeError, match="keep"):
        ops.compact_kv(kv, keep.int(), kv_len, backend=backend)
    with pytest.raises(ValueError, match="kv_len"):
        ops.compact_kv(kv, keep, kv_len[:2], backend=backend)
    with pytest.raises(TypeError, match="kv"):
        ops.compact_kv(kv.long(), keep, kv_len, backend=backend)
